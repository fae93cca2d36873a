"""The pipeline spec loader: what a valid file gives; file:line: field: message for each error."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import make_spec
from edgewise.errors import ConfigError, SpecError
from edgewise.pipeline.operators.window import Window
from edgewise.pipeline.sources.file import FileSource
from edgewise.pipeline.spec import load_pipeline, parse_pipeline, topological_stages
from edgewise.pipeline.units import parse_bytes, parse_duration
from edgewise.specfile.marks import line_of, load_with_lines

HEAD = "apiVersion: edgewise.io/v1\nkind: Pipeline\nmetadata:\n  name: t\nspec:\n"  # 5 lines
SOURCE = "sources:\n  - id: src\n    type: file\n    path: x.ndjson\n"  # lines 6-9


def problems(body: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(SpecError) as info:
        parse_pipeline(HEAD + textwrap.indent(body, "  "), "p.yaml")
    err = info.value
    assert err.path == "p.yaml"
    # the message is one line per problem, each starting with file:line
    lines = str(err).splitlines()
    assert len(lines) == len(err.problems)
    for (line, field, message), text in zip(err.problems, lines, strict=True):
        where = f"p.yaml:{line}" if line else "p.yaml"
        assert text == (f"{where}: {field}: {message}" if field else f"{where}: {message}")
    return err.problems


def test_a_valid_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + textwrap.indent(SOURCE + textwrap.dedent("""\
        stages:
          - id: alarms
            type: threshold
            inputs: [windows]
            high: 10
          - id: windows
            type: window
            inputs: [src]
            size: 500ms
        sinks:
          - id: out
            type: outbox
            inputs: [windows, alarms]
            priority: alarm
          - id: late
            type: log
            inputs: [windows.late]
        outbox: {max_bytes: 64MiB, sync: normal}
        batching: {max_records: 100, linger_ms: 2}
        tick: 50ms
    """), "  "))
    spec = load_pipeline(path)
    assert spec.name == "t"
    assert spec.path == path
    assert [c.id for c in spec.sources] == ["src"] and spec.sources[0].cls is FileSource
    assert spec.sources[0].config.path == "x.ndjson"
    assert [c.id for c in spec.stages] == ["alarms", "windows"]
    assert spec.stages[1].cls is Window and spec.stages[1].config.size == 0.5
    assert [c.id for c in topological_stages(spec)] == ["windows", "alarms"]
    assert [c.entry.inputs for c in spec.sinks] == [["windows", "alarms"], ["windows.late"]]
    assert spec.body.outbox.max_bytes == 64 * 1024**2 and spec.body.outbox.sync == "normal"
    assert spec.body.batching.max_records == 100 and spec.body.tick == 0.05
    assert len(spec.digest) == 16
    assert load_pipeline(path).digest == spec.digest


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    spec = make_spec("sources:\n  - {id: src, type: file, path: in.ndjson}\n", tmp_path)
    assert spec.path.parent == tmp_path


def test_unknown_operator_names_line_field_and_known_types() -> None:
    got = problems(SOURCE + "stages:\n  - id: w\n    type: windw\n    inputs: [src]\n")
    assert got == [(12, "spec.stages.0.type", (
        "unknown operator type 'windw'; known: anomaly, combine, deadband, downsample, fft, "
        "filter, map, partial, python, rate_of_change, threshold, window"
    ))]


def test_unknown_source_and_sink_types() -> None:
    got = problems(
        "sources:\n  - {id: src, type: kafka}\n"
        "sinks:\n  - {id: out, type: s3, inputs: [src]}\n"
    )
    assert got[0][:2] == (7, "spec.sources.0.type")
    assert got[0][2] == (
        "unknown source type 'kafka'; known: file, http, modbus, mqtt, opcua, simulator, "
        "stream"
    )
    assert got[1][:2] == (9, "spec.sinks.0.type")
    assert got[1][2].startswith("unknown sink type 's3'; known: file, log, mqtt, outbox, webhook")


def test_yaml_syntax_error_has_its_line() -> None:
    got = problems("sources:\n  - id: src\n    type: file\n   path: x\n")
    assert got == [(9, "", "not valid YAML: expected <block end>, but found "
                           "'<block mapping start>'")]


def test_duplicate_yaml_key_is_an_error() -> None:
    got = problems(SOURCE + "    path: y.ndjson\n")
    assert got == [(10, "", "not valid YAML: duplicate key 'path' (first at line 9); keep one")]


def test_wrong_field_types_in_a_stage() -> None:
    got = problems(SOURCE + textwrap.dedent("""\
          stages:
            - id: w
              type: window
              inputs: [src]
              size: soon
              aggregates: count
              key_by: [sensor]
            - id: t
              type: threshold
              inputs: [src]
              high: lots
    """))
    assert got == [
        (14, "spec.stages.0.size",
         "'soon' is not a duration; write e.g. '500ms', '1s', '5m' or seconds"),
        (15, "spec.stages.0.aggregates", "Input should be a valid list"),
        (20, "spec.stages.1.high",
         "Input should be a valid number, unable to parse string as a number"),
    ]


def test_cross_field_validation_message() -> None:
    got = problems(SOURCE + "stages:\n  - {id: t, type: threshold, inputs: [src]}\n")
    assert got == [(11, "spec.stages.0", "set high, low or both")]


def test_typo_in_a_stage_key() -> None:
    got = problems(SOURCE + "    bacth: 10\n")
    assert got == [(10, "spec.sources.0.bacth",
                     "Extra inputs are not permitted (remove it or check its spelling)")]


def test_typo_at_the_top_level() -> None:
    got = problems(SOURCE + "outbx: {max_bytes: 1MiB}\n")
    assert got == [(10, "spec.outbx",
                     "Extra inputs are not permitted (remove it or check its spelling)")]


def test_duplicate_id() -> None:
    got = problems(SOURCE + "stages:\n  - {id: src, type: threshold, inputs: [src], high: 1}\n")
    assert got == [(11, "spec.stages.0.id",
                     "duplicate id 'src' (first used at line 7); ids must be unique")]


def test_input_naming_a_missing_id() -> None:
    got = problems(SOURCE + "sinks:\n  - id: out\n    type: log\n    inputs: [srcc]\n")
    assert got == [(13, "spec.sinks.0.inputs.0",
                     "'srcc' is not the id of a source or stage; known: src")]


def test_wiring_errors_ports_sinks_and_missing_inputs() -> None:
    got = problems(SOURCE + textwrap.dedent("""\
          stages:
            - {id: w, type: window, size: 1s, inputs: [src.late]}
            - {id: t, type: threshold, high: 1}
          sinks:
            - id: o
              type: log
              inputs:
                - w.lat
                - o
    """))
    assert got == [
        (12, "spec.stages.1.inputs",
         "missing: list the ids this reads from, e.g. inputs: [sensors]"),
        (11, "spec.stages.0.inputs.0", "'src' has no output 'late'; it has: out"),
        (17, "spec.sinks.0.inputs.0", "'w' has no output 'lat'; it has: out, late"),
        (18, "spec.sinks.0.inputs.1", "'o' is a sink; sinks cannot feed other components"),
    ]


def test_source_with_inputs() -> None:
    got = problems(SOURCE + "    inputs: [src]\n")
    assert got == [(10, "spec.sources.0.inputs", "a source takes no inputs (remove 'inputs')")]


def test_cycle() -> None:
    got = problems(SOURCE + textwrap.dedent("""\
          stages:
            - {id: a, type: threshold, inputs: [src, c], high: 1}
            - {id: b, type: threshold, inputs: [a], high: 1}
            - {id: c, type: threshold, inputs: [b], high: 1}
    """))
    assert got == [(10, "spec.stages", "stages form a cycle: a -> c -> b -> a; break it")]


def test_bad_ids_names_and_header() -> None:
    got = problems("sources:\n  - {id: Src One, type: file, path: x}\n")
    assert got == [(7, "spec.sources.0.id",
                     "String should match pattern '^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$'")]
    with pytest.raises(SpecError) as info:
        parse_pipeline("apiVersion: v2\nkind: Pipe\n", "p.yaml")
    assert info.value.problems == [
        (1, "apiVersion", "Input should be 'edgewise.io/v1' (use one of the allowed values)"),
        (2, "kind", "Input should be 'Pipeline' (use one of the allowed values)"),
        (1, "metadata", "Field required (add it)"),
        (1, "spec", "Field required (add it)"),
    ]


@pytest.mark.parametrize("text", ["", "# nothing\n", "- a\n- b\n", "just text\n"])
def test_not_a_mapping(text: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_pipeline(text, "p.yaml")
    assert str(info.value) == (
        "p.yaml:1: expected a mapping with apiVersion, kind, metadata and spec"
    )


def test_empty_sources_and_bad_settings() -> None:
    got = problems("sources: []\noutbox: {max_bytes: lots, sync: sometimes}\ntick: -1\n")
    assert got == [
        (6, "spec.sources", "List should have at least 1 item after validation, not 0"),
        (7, "spec.outbox.max_bytes",
         "'lots' is not a size; write e.g. '64MiB', '1GB' or a number of bytes"),
        (7, "spec.outbox.sync",
         "Input should be 'full' or 'normal' (use one of the allowed values)"),
        (8, "spec.tick", "a duration cannot be negative"),
    ]


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file") as info:
        load_pipeline(tmp_path / "nope.yaml")
    assert not isinstance(info.value, SpecError)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match=r"bin\.yaml: cannot read"):
        load_pipeline(tmp_path / "bin.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_pipeline(tmp_path)  # a directory


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("1s", 1.0), (" 2 m ", 120.0), ("1.5h", 5400.0), ("1d", 86400.0),
     ("250us", 0.00025), ("3", 3.0), (2, 2.0), (0.25, 0.25), (".5s", 0.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize("bad", ["soon", "-1s", "1 sec", True, None, [1], -1, float("nan")])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [("256MiB", 256 * 1024**2), ("1GB", 10**9), ("64k", 64_000), ("1.5KiB", 1536),
     ("10b", 10), ("7", 7), (4096, 4096), ("2 TiB", 2 * 1024**4)],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("bad", ["lots", "1XB", "-5", True, 1.5, -1, None])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_yaml_lines_of_nested_values() -> None:
    text = "a:\n  b:\n    - x: 1\n      y: [1, 2]\n    - z\nc: 3\n"
    data, lines = load_with_lines(text, "t.yaml")
    assert data == {"a": {"b": [{"x": 1, "y": [1, 2]}, "z"]}, "c": 3}
    assert lines[("a",)] == 1 and lines[("a", "b")] == 2
    assert lines[("a", "b", 0, "x")] == 3 and lines[("a", "b", 0, "y")] == 4
    assert lines[("a", "b", 1)] == 5 and lines[("c",)] == 6
    assert line_of(lines, ("a", "b", 0, "y", 1)) == 4  # nearest ancestor with a line
    assert line_of(lines, ("a", "b", 0, "missing")) == 3
    assert load_with_lines("", "t.yaml") == (None, {})


def test_no_follow_on_errors_for_inputs_naming_a_broken_component() -> None:
    got = problems(SOURCE + textwrap.dedent("""\
        stages:
          - {id: w, type: window, inputs: [src], size: never}
          - {id: x, type: windoww, inputs: [src]}
        sinks:
          - {id: out, type: log, inputs: [w, x, w.late]}
          - {id: out2, type: log, inputs: [w.nope]}
    """))
    assert [(line, field) for line, field, _ in got] == [
        (11, "spec.stages.0.size"),
        (12, "spec.stages.1.type"),
        (15, "spec.sinks.1.inputs.0"),  # a wrong port of a known type is still reported
    ]
    assert got[2][2] == "'w' has no output 'nope'; it has: out, late"


# -- pipelines from the control plane: their files stay inside the allowed folders -----------
CLOUD = HEAD + textwrap.indent(textwrap.dedent("""\
    sources:
      - {{id: src, type: file, path: "{source}"}}
    sinks:
      - {{id: out, type: file, inputs: [src], path: "{sink}"}}
"""), "  ")  # the source's path on line 7, the sink's on line 9


def cloud_spec(base: Path, source: str, sink: str, allowed: tuple[Path, ...] = ()) -> Any:
    from edgewise.pipeline.paths import Confinement

    return parse_pipeline(CLOUD.format(source=source, sink=sink), "desired-v1-t.yaml",
                          confinement=Confinement(base, allowed))


async def test_a_pipeline_from_the_cloud_names_files_only_inside_the_allowed_folders(
        tmp_path: Path) -> None:
    from edgewise.pipeline.engine import Engine

    base = tmp_path / "node" / "pipelines"
    base.mkdir(parents=True)
    outside = (tmp_path / "outside").resolve()
    outside.mkdir()
    (outside / "in.ndjson").write_text('{"sensor": "a", "ts": 1, "value": 2.5}\n')
    (base / "link").symlink_to(outside)  # inside by its name, outside where it leads
    real = base.resolve()
    roots = (f"allowed: {real}; name a file inside one of them (relative paths are taken from "
             f"{real}), or allow its folder on the node with `edgewise agent run --allow-path "
             "DIR`")
    out = "is outside the folders this node allows for pipelines from the control plane"
    escape = real.parents[2] / "escape"  # where ../../../ leads from the base

    with pytest.raises(SpecError) as err:
        cloud_spec(base, str(outside / "in.ndjson"), "../../../escape/y.ndjson")
    assert err.value.problems == [
        (7, "spec.sources.0.path", f"'{outside}/in.ndjson' {out}; {roots}"),
        (9, "spec.sinks.0.path",
         f"'../../../escape/y.ndjson' {out} (it resolves to {escape}/y.ndjson); {roots}"),
    ]
    # symlinks are followed before `..` is applied, as the kernel does
    with pytest.raises(SpecError) as err:
        cloud_spec(base, "link/in.ndjson", "link/../y.ndjson")
    assert err.value.problems == [
        (7, "spec.sources.0.path",
         f"'link/in.ndjson' {out} (it resolves to {outside}/in.ndjson); {roots}"),
        (9, "spec.sinks.0.path",
         f"'link/../y.ndjson' {out} (it resolves to {outside.parent}/y.ndjson); {roots}"),
    ]
    with pytest.raises(SpecError, match=r"spec.sinks.0.path: 'a\\x00b' is not a usable path"):
        cloud_spec(base, "in.ndjson", "a\\0b")
    assert not escape.exists() and not (outside.parent / "y.ndjson").exists()

    # a folder the node's operator allowed; relative paths are taken from the base, the sink's
    # too (not from the engine's data directory), and the component opens the checked path
    spec = cloud_spec(base, "link/in.ndjson", "out/y.ndjson", allowed=(tmp_path / "outside",))
    assert spec.path.parent == base
    assert spec.sources[0].config.file_path("path", Path("/elsewhere")) == outside / "in.ndjson"
    assert spec.sinks[0].config.file_path("path", Path("/elsewhere")) == real / "out" / "y.ndjson"
    assert spec.sources[0].config.path == "link/in.ndjson"  # the config (and its digest) as given
    await Engine(spec, tmp_path / "data").run()
    assert (real / "out" / "y.ndjson").read_text().count("\n") == 1
    assert not (tmp_path / "data" / "out").exists()
    spec = cloud_spec(base, str(outside / "in.ndjson"), "../../outside/copy.ndjson",
                      allowed=(outside,))
    assert spec.sinks[0].config.file_path("path", base) == outside / "copy.ndjson"

    # a pipeline given on the node itself is the node operator's own: not confined
    local = parse_pipeline(CLOUD.format(source=outside / "in.ndjson", sink="../../../x.ndjson"),
                           "p.yaml", base_dir=base)
    assert local.sinks[0].config.file_path("path", tmp_path / "d") == (
        tmp_path / "d" / "../../../x.ndjson")


def test_every_file_parameter_is_confined_also_optional_and_nested_ones(tmp_path: Path) -> None:
    from edgewise.pipeline.component import ComponentConfig, FilePath
    from edgewise.pipeline.paths import Confinement, confine

    class Inner(ComponentConfig):
        file: FilePath

    class Outer(ComponentConfig):
        log: FilePath | None = None
        name: str = "../../not-a-path"
        inner: list[Inner] = []
        by_key: dict[str, Inner] = {}

    cfg = Outer.model_validate({"log": "a.log", "inner": [{"file": "ok"}, {"file": "/etc/x"}],
                                "by_key": {"k": {"file": "../up"}}})
    problems = confine(cfg, Confinement(tmp_path / "base"))
    assert [loc for loc, _ in problems] == [("inner", 1, "file"), ("by_key", "k", "file")]
    assert cfg.file_path("log", Path("/x")) == tmp_path.resolve() / "base" / "a.log"
    assert cfg.inner[0].file_path("file", Path("/x")) == tmp_path.resolve() / "base" / "ok"
    assert confine(Outer(), Confinement(tmp_path / "base")) == []
