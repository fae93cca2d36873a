"""User operators: `type: python` (plain classes), Operator subclasses, the entry-point group,
and the example plugin in examples/plugins."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from conftest import make_spec
from edgewise.errors import ConfigError, SpecError
from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import RunContext
from edgewise.pipeline.engine import Engine
from edgewise.pipeline.operators.plugin import (
    PluginError,
    PythonConfig,
    PythonOperator,
    check_operator_class,
    load_user_class,
)
from edgewise.pipeline.spec import load_pipeline

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plugins"

WriteModule = Callable[[str], str]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteModule]:
    """Write a uniquely named module into tmp_path (on sys.path); return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def write(source: str) -> str:
        name = f"userop_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


@pytest.fixture
def example_on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    sys.modules.pop("edgewise_units", None)


PLAIN = """
import numpy as np
from edgewise.pipeline.batch import Batch

class Scale:
    raises_alarms = False

    def __init__(self, options):
        self.factor = float(options.get("factor", 2.0))
        self.seen = 0
        self.timer_calls = []

    def process(self, batch):
        self.seen += batch.n
        return batch.with_columns(value=batch["value"] * self.factor)

    def on_timer(self, idle_s):
        self.timer_calls.append(idle_s)
        return None

    def flush(self):
        return {"out": Batch.from_records([{"sensor": "summary", "ts": 0.0,
                                           "value": float(self.seen)}])}

    def snapshot(self):
        return {"seen": self.seen}

    def restore(self, state):
        self.seen = state["seen"]

class Minimal:
    def __init__(self, options):
        pass

    def process(self, batch):
        return None

class Alarmer(Minimal):
    raises_alarms = True

    def process(self, batch):
        return batch.take(batch["value"] > 100)

class Returns:
    def __init__(self, options):
        self.what = options["what"]

    def process(self, batch):
        if self.what == "list":
            return [1, 2]
        if self.what == "port":
            return {"alarms": batch}
        if self.what == "not-batch":
            return {"out": "text"}
        if self.what == "ragged":
            return Batch({"value": np.zeros(batch.n + 1)}, batch.n)
        if self.what == "raise":
            raise KeyError("value2")
        if self.what == "dict-none":
            return {"out": None}
        return batch

class BadState(Minimal):
    def snapshot(self):
        return {"when": object()}

class Picky:
    def __init__(self, options):
        if "factor" not in options:
            raise ValueError("option 'factor' is required")

    def process(self, batch):
        return batch

def not_a_class(batch):
    return batch

class NoProcess:
    def __init__(self, options):
        pass

class ProcessNotCallable:
    process = 3

    def __init__(self, options):
        pass
"""


def op_for(path: str, options: dict[str, Any] | None = None) -> PythonOperator:
    cfg = PythonConfig.model_validate({"class": path, "options": options or {}})
    return PythonOperator("p", cfg, RunContext("t", Path(".")))


def readings(values: list[float]) -> Batch:
    b = Batch.from_records(
        [{"sensor": "a", "ts": float(i), "value": float(v)} for i, v in enumerate(values)]
    )
    return b.with_columns(**{ACCEPTED: np.arange(len(values), dtype=float)})


# -- the plain-class interface ---------------------------------------------------------------
def test_plain_class_process_and_optional_methods(write_module: WriteModule) -> None:
    mod = write_module(PLAIN)
    op = op_for(f"{mod}:Scale", {"factor": 3})
    out = op.process(readings([1.0, 2.5]))
    assert out.to_records() == [{"sensor": "a", "ts": 0.0, "value": 3.0},
                                {"sensor": "a", "ts": 1.0, "value": 7.5}]
    assert out[ACCEPTED].tolist() == [0.0, 1.0]
    assert op.on_timer(0.25) is None
    assert op.inner.timer_calls == [0.25]
    state = ckpt.unpack(ckpt.pack(op.snapshot()))
    assert state == {"seen": 2}
    fresh = op_for(f"{mod}:Scale", {"factor": 3})
    fresh.restore(state)
    fresh.process(readings([1.0]))
    assert fresh.flush()["out"].to_records() == [{"sensor": "summary", "ts": 0.0, "value": 3.0}]
    assert op.raises_alarms is False


def test_options_are_a_copy(write_module: WriteModule) -> None:
    mod = write_module(PLAIN)
    cfg = PythonConfig.model_validate({"class": f"{mod}:Scale", "options": {"factor": 2}})
    op = PythonOperator("p", cfg, RunContext("t", Path(".")))
    assert op.inner.factor == 2.0
    assert cfg.options == {"factor": 2}


def test_minimal_class_without_optional_methods(write_module: WriteModule) -> None:
    mod = write_module(PLAIN)
    op = op_for(f"{mod}:Minimal")
    assert op.process(readings([1.0])) is None
    assert op.on_timer(1.0) is None
    assert op.flush() is None
    assert op.snapshot() is None
    op.restore({"anything": 1})  # no restore method: ignored
    assert op.raises_alarms is False


def test_raises_alarms_attribute_is_honoured(write_module: WriteModule) -> None:
    mod = write_module(PLAIN)
    assert op_for(f"{mod}:Alarmer").raises_alarms is True


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("list", "stage 'p': {cls}.process() returned list; return a Batch, a dict "
                 "{{'out': Batch}} or None"),
        ("port", "stage 'p': {cls}.process() returned port 'alarms'; a type: python stage has "
                 "only the port 'out'"),
        ("not-batch", "stage 'p': {cls}.process() returned str for port 'out'; expected a "
                      "Batch or None"),
        ("ragged", "stage 'p': {cls}.process() returned a Batch whose column 'value' is not a "
                   "numpy array of its 1 records"),
        ("raise", "stage 'p': {cls}.process() raised KeyError: 'value2'"),
    ],
)
def test_broken_results_are_plugin_errors(write_module: WriteModule, what: str,
                                          message: str) -> None:
    mod = write_module(PLAIN)
    cls = f"{mod}:Returns"
    op = op_for(cls, {"what": what})
    with pytest.raises(PluginError) as err:
        op.process(readings([1.0]))
    assert str(err.value).startswith(message.format(cls=cls)), str(err.value)
    assert isinstance(err.value, ConfigError)
    if what == "raise":
        assert isinstance(err.value.__cause__, KeyError)  # the traceback is kept for debugging


def test_dict_results_are_accepted(write_module: WriteModule) -> None:
    mod = write_module(PLAIN)
    assert op_for(f"{mod}:Returns", {"what": "dict-none"}).process(readings([1.0])) == {
        "out": None
    }
    b = readings([1.0])
    assert op_for(f"{mod}:Returns", {"what": "same"}).process(b) is b


def test_state_that_cannot_be_checkpointed(write_module: WriteModule) -> None:
    mod = write_module(PLAIN)
    with pytest.raises(PluginError) as err:
        op_for(f"{mod}:BadState").snapshot()
    assert str(err.value).startswith(
        f"stage 'p': {mod}:BadState.snapshot() returned state that cannot be checkpointed ("
    )


def test_options_refused_by_the_class(write_module: WriteModule) -> None:
    mod = write_module(PLAIN)
    with pytest.raises(PluginError) as err:
        op_for(f"{mod}:Picky", {"factr": 2})
    assert str(err.value) == (
        f"stage 'p': {mod}:Picky rejected its options {{'factr': 2}}: "
        "ValueError: option 'factor' is required"
    )


def test_a_stateless_class_has_its_bad_records_isolated_by_halving(
    write_module: WriteModule,
) -> None:
    mod = write_module("""
        class Halves:
            stateless = True

            def __init__(self, options):
                self.sizes = []

            def process(self, batch):
                self.sizes.append(batch.n)
                if (batch["value"] < 0).any():
                    raise ValueError("negative")
                return batch
        """)
    letters: list[Any] = []
    cfg = PythonConfig.model_validate({"class": f"{mod}:Halves"})
    op = PythonOperator("p", cfg, RunContext("t", Path("."), dead_letter=letters.append))
    out = op.process(readings([1.0, 2.0, 3.0, -4.0, 5.0, 6.0, 7.0, 8.0]))
    assert isinstance(out, dict)
    assert out["out"]["value"].tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0]
    assert out["out"][ACCEPTED].tolist() == [0.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0]
    assert op.inner.sizes == [8, 4, 2, 2, 1, 1, 4]  # the whole, then halves down to the record
    (letter,) = letters
    assert (letter.source, letter.reason) == ("p", f"stage 'p': {mod}:Halves.process() raised "
                                                   "ValueError: negative")
    assert orjson.loads(letter.payload) == {"sensor": "a", "ts": 3.0, "value": -4.0}
    assert letter.size == len(letter.payload)
    # a good batch is one call, its result handed on as it is
    b = readings([1.0])
    assert op.process(b) is b
    # without the declaration the raise stops the run
    plain = write_module("""
        class Plain:
            def __init__(self, options):
                pass

            def process(self, batch):
                raise ValueError("negative")
        """)
    with pytest.raises(PluginError, match=r"Plain.process\(\) raised ValueError: negative"):
        op_for(f"{plain}:Plain").process(readings([1.0]))


def test_timeout_must_be_positive(write_module: WriteModule) -> None:
    mod = write_module(PLAIN)
    assert op_for(f"{mod}:Minimal").timeout == 1.0
    cfg = PythonConfig.model_validate({"class": f"{mod}:Minimal", "timeout": "250ms"})
    assert cfg.timeout == 0.25
    body = f"""
    sources:
      - {{id: s, type: simulator, realtime: false, limit: 10}}
    stages:
      - {{id: p, type: python, inputs: [s], class: "{mod}:Minimal", timeout: 0}}
    """
    with pytest.raises(SpecError, match="timeout must be more than 0"):
        make_spec(body)


# -- load errors: spec errors with the line -------------------------------------------------
def spec_error(cls_value: str, options: str = "{}") -> str:
    body = f"""
    sources:
      - {{id: s, type: simulator, realtime: false, limit: 10}}
    stages:
      - id: p
        type: python
        inputs: [s]
        class: "{cls_value}"
        options: {options}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    return str(err.value)


def test_bad_import_paths_are_spec_errors(write_module: WriteModule) -> None:
    mod = write_module(PLAIN)
    assert spec_error("no_colon_here") == (
        "<test>:12: spec.stages.0.class: 'no_colon_here' is not an import path; "
        "write it as 'package.module:ClassName'"
    )
    assert spec_error("nowhere_pkg_x.mod:Thing") == (
        "<test>:12: spec.stages.0.class: cannot import 'nowhere_pkg_x.mod': No module named "
        "'nowhere_pkg_x' (install the package into this Python environment or put its folder "
        "on PYTHONPATH)"
    )
    assert spec_error(f"{mod}:Nope") == (
        f"<test>:12: spec.stages.0.class: module '{mod}' has no 'Nope'"
    )
    assert spec_error(f"{mod}:not_a_class") == (
        f"<test>:12: spec.stages.0.class: '{mod}:not_a_class' is a function, not a class"
    )
    assert spec_error(f"{mod}:NoProcess") == (
        f"<test>:12: spec.stages.0.class: class '{mod}:NoProcess' has no process(batch) method; "
        "a user operator must define it"
    )
    assert spec_error(f"{mod}:ProcessNotCallable") == (
        f"<test>:12: spec.stages.0.class: class '{mod}:ProcessNotCallable' has no process(batch) "
        "method; a user operator must define it"
    )


def test_module_that_fails_to_import_is_a_spec_error(write_module: WriteModule) -> None:
    broken = write_module("import math\nraise RuntimeError('no licence file')\n")
    assert spec_error(f"{broken}:X") == (
        f"<test>:12: spec.stages.0.class: importing '{broken}' failed: RuntimeError: "
        "no licence file"
    )
    syntax = write_module("def f(:\n")
    assert spec_error(f"{syntax}:X").startswith(
        f"<test>:12: spec.stages.0.class: importing '{syntax}' failed: SyntaxError: "
    )


def test_missing_class_is_a_spec_error() -> None:
    body = """
    sources:
      - {id: s, type: simulator, realtime: false, limit: 10}
    stages:
      - {id: p, type: python, inputs: [s], options: {a: 1}}
    """
    with pytest.raises(SpecError) as err:
        make_spec(body)
    assert str(err.value) == "<test>:9: spec.stages.0.class: Field required (add it)"


def test_load_user_class_directly(write_module: WriteModule) -> None:
    mod = write_module(PLAIN)
    assert load_user_class(f"{mod}:Scale").__name__ == "Scale"
    with pytest.raises(PluginError):
        load_user_class(":Scale")
    with pytest.raises(PluginError):
        load_user_class("a b:C")


# -- Operator subclasses by class path ------------------------------------------------------
def test_operator_subclass_by_class_path_uses_its_config() -> None:
    op = op_for("edgewise.pipeline.operators.threshold:Threshold", {"high": 100.0})
    assert op.raises_alarms is True
    out = op.process(readings([50.0, 150.0]))
    assert out["kind"].tolist() == ["high"]
    assert spec_error("edgewise.pipeline.operators.threshold:Threshold", "{high: lots}") == (
        "<test>:13: spec.stages.0.options: options of "
        "edgewise.pipeline.operators.threshold:Threshold: high: Input should be a valid "
        "number, unable to parse string as a number"
    )


def test_check_operator_class() -> None:
    with pytest.raises(PluginError) as err:
        check_operator_class(dict, "mine")
    assert str(err.value).startswith(
        "operator 'mine' is <class 'dict'>, not a subclass of edgewise.pipeline.component.Operator"
    )
    from edgewise.pipeline.component import Operator

    class NoProc(Operator):
        pass

    with pytest.raises(PluginError) as err:
        check_operator_class(NoProc, "mine")
    assert str(err.value) == "operator 'mine' (test_check_operator_class.<locals>.NoProc) " \
        "does not implement process()"


# -- through the engine ---------------------------------------------------------------------
def write_readings(path: Path, values: list[float], t0: float = 1000.0) -> None:
    with path.open("ab") as f:
        for i, v in enumerate(values):
            f.write(orjson.dumps({"sensor": "line1/temp/001", "ts": t0 + i, "value": v}) + b"\n")


async def test_example_plugin_through_the_engine_with_restart(
    tmp_path: Path, example_on_path: None
) -> None:
    src = tmp_path / "in.ndjson"
    write_readings(src, [0.0, 100.0, 37.0])
    body = f"""
    sources:
      - {{id: s, type: file, path: "{src}"}}
    stages:
      - id: f
        type: python
        inputs: [s]
        class: "edgewise_units:UnitConvert"
        options: {{from: degC, to: degF, output: fahrenheit, decimals: 2}}
    sinks:
      - {{id: out, type: file, inputs: [f], path: out.ndjson}}
    """
    engine = Engine(make_spec(body), tmp_path / "data")
    await engine.run()
    assert engine.stages["f"].inner.converted == 3
    write_readings(src, [-40.0, 20.0], t0=2000.0)  # more input; a second run continues
    engine = Engine(make_spec(body), tmp_path / "data")
    summary = await engine.run()
    assert summary["readings_in"] == 2
    assert engine.stages["f"].inner.converted == 5  # restored from the checkpoint, then +2
    got = [orjson.loads(x) for x in (tmp_path / "data" / "out.ndjson").read_bytes().splitlines()]
    assert [(r["value"], r["fahrenheit"]) for r in got] == [
        (0.0, 32.0), (100.0, 212.0), (37.0, 98.6), (-40.0, -40.0), (20.0, 68.0),
    ]


def test_example_plugin_rejects_bad_units(example_on_path: None) -> None:
    with pytest.raises(PluginError) as err:
        op_for("edgewise_units:UnitConvert", {"from": "degC", "to": "bar"})
    assert str(err.value) == (
        "stage 'p': edgewise_units:UnitConvert rejected its options "
        "{'from': 'degC', 'to': 'bar'}: ValueError: cannot convert temperature (degC) to "
        "pressure (bar)"
    )


def test_example_pipeline_file_is_valid(example_on_path: None) -> None:
    spec = load_pipeline(EXAMPLES / "unit-conversion.yaml")
    assert [(c.id, c.entry.type) for c in spec.stages] == [
        ("temps", "filter"), ("fahrenheit", "python"), ("boiling", "threshold"),
    ]


async def test_example_pipeline_runs(tmp_path: Path, example_on_path: None) -> None:
    text = (EXAMPLES / "unit-conversion.yaml").read_text()
    text = text.replace("      seed: 42\n",
                        "      seed: 42\n      realtime: false\n      limit: 20000\n"
                        "      start: 1700000000\n")
    path = tmp_path / "p.yaml"
    path.write_text(text)
    spec = load_pipeline(path)
    summary = await Engine(spec, tmp_path / "data").run()
    temps = summary["stages"]["temps"]["out"]
    assert summary["stages"]["fahrenheit"]["out"] == temps
    assert 0 < temps < 20000
    # alarms at 212 F are exactly the readings above 100 C
    spec_c = make_spec("""
    sources:
      - {id: sensors, type: simulator, seed: 42, realtime: false, limit: 20000,
         start: 1700000000}
    stages:
      - {id: temps, type: filter, inputs: [sensors], where: "contains(sensor, '/temp/')"}
      - {id: boiling, type: threshold, inputs: [temps], high: 100.0}
    """)
    summary_c = await Engine(spec_c, tmp_path / "data-c").run()
    assert summary["alarms"] == summary_c["alarms"]
    assert summary["alarms"] > 0


def make_dist(site: Path, name: str, entry_points: str) -> None:
    """A minimal installed distribution (dist-info) so importlib.metadata finds entry points."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


ENTRY_OP = """
from pydantic import Field
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Operator


class OffsetConfig(ComponentConfig):
    offset: float = Field(ge=0)


class Offset(Operator):
    Config = OffsetConfig
    raises_alarms = True

    def process(self, batch):
        return batch.with_columns(value=batch["value"] + self.config.offset)
"""


async def test_entry_point_operator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    write_module: WriteModule) -> None:
    mod = write_module(ENTRY_OP)
    site = tmp_path / "site"
    make_dist(site, "offset_plugin", f"[edgewise.operators]\noffset_{mod} = {mod}:Offset\n")
    monkeypatch.syspath_prepend(str(site))
    src = tmp_path / "in.ndjson"
    write_readings(src, [1.0, 2.0])
    spec = make_spec(f"""
    sources:
      - {{id: s, type: file, path: "{src}"}}
    stages:
      - {{id: o, type: offset_{mod}, inputs: [s], offset: 0.5}}
    sinks:
      - {{id: out, type: file, inputs: [o], path: out.ndjson}}
    """)
    summary = await Engine(spec, tmp_path / "data").run()
    got = [orjson.loads(x) for x in (tmp_path / "data" / "out.ndjson").read_bytes().splitlines()]
    assert [r["value"] for r in got] == [1.5, 2.5]
    assert summary["alarms"] == 2
    with pytest.raises(SpecError) as err:
        make_spec(f"""
        sources:
          - {{id: s, type: file, path: "{src}"}}
        stages:
          - {{id: o, type: offset_{mod}, inputs: [s], offset: -1}}
        """)
    assert str(err.value) == (
        "<test>:9: spec.stages.0.offset: Input should be greater than or equal to 0"
    )


async def test_example_entry_point_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        example_on_path: None) -> None:
    site = tmp_path / "site"
    make_dist(site, "edgewise_units",
              "[edgewise.operators]\nunit_convert = edgewise_units:UnitConvertOperator\n")
    monkeypatch.syspath_prepend(str(site))
    src = tmp_path / "in.ndjson"
    write_readings(src, [1.0, 2.5])
    spec = make_spec(f"""
    sources:
      - {{id: s, type: file, path: "{src}"}}
    stages:
      - {{id: c, type: unit_convert, inputs: [s], from: bar, to: kPa}}
    sinks:
      - {{id: out, type: file, inputs: [c], path: out.ndjson}}
    """)
    await Engine(spec, tmp_path / "data").run()
    got = [orjson.loads(x) for x in (tmp_path / "data" / "out.ndjson").read_bytes().splitlines()]
    assert [r["value"] for r in got] == [100.0, 250.0]
    with pytest.raises(SpecError) as err:
        make_spec(f"""
        sources:
          - {{id: s, type: file, path: "{src}"}}
        stages:
          - {{id: c, type: unit_convert, inputs: [s], from: bar, to: degC}}
        """)
    assert str(err.value) == (
        "<test>:9: spec.stages.0: cannot convert pressure (bar) to temperature (degC)"
    )


@pytest.mark.parametrize("target", ["no_such_module_xyz:Thing", "json:JSONDecoder"])
def test_broken_entry_point_is_a_spec_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           target: str) -> None:
    site = tmp_path / "site"
    name = f"broken_{uuid.uuid4().hex[:8]}"
    make_dist(site, name, f"[edgewise.operators]\n{name} = {target}\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(SpecError):
        make_spec(f"""
        sources:
          - {{id: s, type: simulator, realtime: false, limit: 10}}
        stages:
          - {{id: b, type: {name}, inputs: [s]}}
        """)


# -- the control plane's check: no code loaded (load_code=False) -----------------------------
PROBE = """
from pathlib import Path
Path({marker!r}).write_text("imported")


class Probe:
    def __init__(self, options):
        pass

    def process(self, batch):
        return batch
"""


def no_code_problems(stage: str, port: str = "") -> list[str]:
    """The problems `parse_pipeline(load_code=False)` finds in a pipeline with ``stage``
    (read by a sink from its ``port``)."""
    from edgewise.pipeline.spec import parse_pipeline

    text = ("apiVersion: edgewise.io/v1\nkind: Pipeline\nmetadata: {name: t}\nspec:\n"
            "  sources:\n    - {id: s, type: simulator, realtime: false, limit: 10}\n"
            f"  stages:\n    - {stage}\n"
            f"  sinks:\n    - {{id: out, type: log, inputs: [p{port}]}}\n")
    try:
        spec = parse_pipeline(text, "pushed.yaml", load_code=False)
    except SpecError as exc:
        return [message for _line, _field, message in exc.problems]
    assert [c.id for c in spec.stages] == ["p"]
    return []


def test_the_control_planes_check_imports_no_plugin_and_answers_alike_whatever_is_installed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_module: WriteModule) -> None:
    marker = tmp_path / "imported.txt"
    mod = write_module(PROBE.format(marker=str(marker)))
    ep_mod = write_module(PROBE.format(marker=str(marker)))
    ep_name = f"probe_{uuid.uuid4().hex[:8]}"
    make_dist(tmp_path / "site", ep_name, f"[edgewise.operators]\n{ep_name} = {ep_mod}:Probe\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    # class references: installed here, missing, broken, not a class, a built-in's module
    for ref in (f"{mod}:Probe", "nowhere_pkg_x.mod:Thing", f"{mod}:Nope", "this:Zen",
                "json:JSONDecoder", "edgewise.pipeline.operators.threshold:Threshold"):
        stage = f'{{id: p, type: python, inputs: [s], class: "{ref}", options: {{high: x}}}}'
        assert no_code_problems(stage) == [], ref
    # entry-point names: registered here or not, parameters and ports are the node's to check
    for name in (ep_name, "unit_convert", "vendor.unit-convert2"):
        stage = f"{{id: p, type: {name}, inputs: [s], any: [1, 2]}}"
        assert no_code_problems(stage, ".alarms") == [], name
    assert not marker.exists()
    assert mod not in sys.modules and ep_mod not in sys.modules and "this" not in sys.modules
    # what is refused is refused by its form, with one message
    assert no_code_problems('{id: p, type: python, inputs: [s], class: "a b:C"}') == [
        "'a b:C' is not an import path; write it as 'package.module:ClassName'"]
    assert no_code_problems('{id: p, type: python, inputs: [s], class: "os.path"}') == [
        "'os.path' is not an import path; write it as 'package.module:ClassName'"]
    assert no_code_problems('{id: p, type: "../evil", inputs: [s]}') == [
        "unknown operator type '../evil': neither built in (anomaly, combine, deadband, "
        "downsample, fft, filter, map, partial, python, rate_of_change, threshold, window) nor "
        "the name of a plugin (an "
        "entry point in 'edgewise.operators': a letter, then letters, digits, '_', '-' or '.', "
        "at most 64 characters)"]
    # built-ins are still checked in full
    assert no_code_problems("{id: p, type: threshold, inputs: [s], high: lots}") == [
        "Input should be a valid number, unable to parse string as a number"]
    assert not marker.exists()
    # the node loads and checks it all (and the import happens there)
    with pytest.raises(SpecError, match=f"module '{mod}' has no 'Nope'"):
        make_spec(f"""
        sources:
          - {{id: s, type: simulator, realtime: false, limit: 10}}
        stages:
          - {{id: p, type: python, inputs: [s], class: "{mod}:Nope"}}
        """)
    assert marker.exists()
