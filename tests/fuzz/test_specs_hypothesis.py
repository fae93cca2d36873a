"""Hypothesis over the pipeline and workload specs: arbitrary text, mutated lines of the real
examples, and mutated document trees dumped back to YAML.

`parse_pipeline` (what ``PUT /v1/config`` runs on operator input, and a node on what the cloud
sends) and `parse_workload` (``edgewise plan``) must either return their result or raise a
`ConfigError` (a `SpecError` naming file, line and field); never another exception. Module
imports that fuzzed ``type: python`` stages would trigger are refused (only modules already
loaded or of ``edgewise`` may be imported) so no fuzzed text runs code.

The explicit cases at the end are what fuzzing this area found (deep nesting, an alias bomb);
they failed before `specfile.marks.check_shape` bounded a document's depth and expanded size.
"""

from __future__ import annotations

import importlib
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fuzzkit import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from edgewise.errors import ConfigError
from edgewise.pipeline.spec import PipelineSpec, parse_pipeline
from edgewise.plan.workload import Workload, parse_workload

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = [ROOT / "examples" / "factory-line.yaml",
             ROOT / "examples" / "plugins" / "unit-conversion.yaml"]
WORKLOADS = sorted((ROOT / "examples" / "workloads").glob("*.yaml"))

# YAML that tends to break loaders: anchors, aliases, tags, flow syntax, odd scalars
TOKENS = ["&a", "*a", "&a [1, 2]", "*b", "!!python/object:os.system", "!!binary aGk=", "!!set",
          "!!omap", "!!timestamp x", "{", "}", "[", "]", "[[[[", "]]]]", "? ", ": ", "- ", "|",
          ">", "---", "...", "%YAML 1.1", "~", "null", "true", "no", ".nan", ".inf", "-.inf",
          "1e999", "-1e999", "0x7fffffffffffffffff", "9" * 40, "0o777", "1_000", "0.1.2",
          "2001-12-14t21:59:43.10-05:00", "''", '""', "'\\x00'", '"\\ud800"', "\t", "\x00",
          "\ufeff", "\u2028", "#", "@", "`", "<<: *a", "<<: [*a, *a]", "1s", "-1s", "1e9s",
          "99999999999999999999h", "1GiB", "-5MiB", "python", "window", "threshold", "outbox",
          "file", "simulator", "inputs: [x]", "inputs: []", "type: python",
          "class: 'nope_fuzz_module:X'", "path: ../../../etc/passwd", "path: /etc/shadow"]


def _guarded_import(real: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(name: str, package: str | None = None) -> Any:
        full = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        if full in sys.modules or full.split(".")[0] == "edgewise":
            return real(name, package)
        raise ModuleNotFoundError(f"fuzzing: no import of {full!r}", name=full)
    return guarded


@pytest.fixture
def no_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(importlib, "import_module", _guarded_import(importlib.import_module))
    yield


def _parse(kind: str, text: str, base: Path) -> None:
    try:
        if kind == "pipeline":
            assert isinstance(parse_pipeline(text, "<fuzz>", base_dir=base), PipelineSpec)
        else:
            assert isinstance(parse_workload(text, "<fuzz>"), Workload)
    except ConfigError as exc:  # SpecError, BadRequest, PluginError ...: all say what is wrong
        assert str(exc), "an error without a message"


def _parse_strict(kind: str, text: str, base: Path) -> None:
    if kind == "pipeline":
        parse_pipeline(text, "<fuzz>", base_dir=base)
    else:
        parse_workload(text, "<fuzz>")


# -- strategies --------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(TOKENS), st.sampled_from(
        ["1s", "0s", "-1s", "250ms", "1e308s", "16MiB", "0B", "alarm", "normal", "none",
         "count", "mean", "sensor", "value", "ts", "out", "late", "sensors", "windows"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12) | st.sampled_from(
        ["id", "type", "inputs", "spec", "metadata", "name", "params", "operator"]),
        inner, max_size=4)), max_leaves=20)


@st.composite
def line_mutations(draw: st.DrawFn, text: str) -> str:
    """The example's lines with a few deleted, duplicated, cut or given a token."""
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "dup", "token", "cut", "indent", "text", "swap"]))
        if op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "token":
            line = lines[i]
            at = draw(st.integers(0, len(line)))
            lines[i] = line[:at] + draw(st.sampled_from(TOKENS)) + line[at:]
        elif op == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif op == "indent":
            lines[i] = " " * draw(st.integers(0, 9)) + lines[i].lstrip()
        elif op == "text":
            lines.insert(i, draw(st.text(max_size=40)))
        else:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n---\n", "\n...\n"]))


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


@st.composite
def tree_mutations(draw: st.DrawFn, text: str) -> str:
    """The example as a tree, with values replaced, keys removed or added, then as YAML."""
    doc = yaml.safe_load(text)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(values)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(values)
        else:
            parent.append(draw(values))
    return yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), sort_keys=False)


def _texts(files: list[Path]) -> list[str]:
    return [p.read_text() for p in files]


def any_text(files: list[Path]) -> st.SearchStrategy[str]:
    texts = _texts(files)
    return st.one_of(
        st.text(max_size=300),
        st.sampled_from(texts).flatmap(line_mutations),
        st.sampled_from(texts).flatmap(tree_mutations),
    )


# -- the fuzz tests ----------------------------------------------------------------------------


def test_examples_parse() -> None:
    """The seeds of the mutations are valid (else the fuzzers only fuzz errors)."""
    for p in PIPELINES[:1]:
        parse_pipeline(p.read_text(), str(p), base_dir=p.parent)
    for p in WORKLOADS:
        parse_workload(p.read_text(), str(p))


@pytest.mark.usefixtures("no_imports")
@pytest.mark.parametrize("kind", ["pipeline", "workload"])
def test_specs_refuse_only_with_config_errors(kind: str, tmp_path: Path) -> None:
    files = PIPELINES if kind == "pipeline" else WORKLOADS

    @fuzz_settings(250 if kind == "pipeline" else 120)
    @given(text=any_text(files))
    def run(text: str) -> None:
        _parse(kind, text, tmp_path)

    run()


@pytest.mark.usefixtures("no_imports")
def test_pipeline_documents_of_any_values(tmp_path: Path) -> None:
    """Whole documents of arbitrary YAML values under the right top-level keys."""
    doc = st.fixed_dictionaries({
        "apiVersion": st.sampled_from(["edgewise.io/v1"]) | scalars,
        "kind": st.sampled_from(["Pipeline"]) | scalars,
        "metadata": st.fixed_dictionaries({"name": st.text(max_size=20) | scalars}),
        "spec": st.fixed_dictionaries({}, optional={
            "sources": st.lists(values, max_size=3), "stages": st.lists(values, max_size=3),
            "sinks": st.lists(values, max_size=3), "outbox": values, "batching": values}),
    })

    @fuzz_settings(150)
    @given(doc=doc)
    def run(doc: dict[str, Any]) -> None:
        try:
            text = yaml.safe_dump(doc)
        except yaml.YAMLError:
            return
        _parse("pipeline", text, tmp_path)

    run()


# -- found by fuzzing, fixed in specfile.marks.check_shape -------------------------------------


def _alias_bomb(levels: int) -> str:
    """``levels`` anchors, each a list of nine aliases of the one before: 9**levels leaves."""
    text = 'a0: &a0 ["x","x","x","x","x","x","x","x","x"]\n'
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


@pytest.mark.parametrize("kind", ["pipeline", "workload"])
@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000,
                                  "a: " + "{b: " * 3000 + "1" + "}" * 3000])
def test_found_deep_nesting_is_a_spec_error(kind: str, text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        _parse_strict(kind, text, tmp_path)


def test_found_alias_bomb_is_refused_cheaply(tmp_path: Path) -> None:
    text = _alias_bomb(6)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
            _parse_strict("pipeline", text, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB to refuse {len(text)} bytes"
