"""User operators: ``type: python`` with ``class: "package.module:ClassName"``.

    - id: to-celsius
      type: python
      inputs: [sensors]
      class: "edgewise_units:UnitConvert"
      options: {field: value, from: degF, to: degC}

The plugin interface (stable; see docs/plugins.md):

* ``__init__(self, options: dict)``: gets the stage's ``options`` mapping (a copy).
* ``process(self, batch) -> Batch | dict[str, Batch] | None``: required. The only output port of
  a ``type: python`` stage is ``out``.
* optional: ``on_timer(self, idle_s)``, ``flush(self)`` (same return types as ``process``),
  ``snapshot(self)`` (plain data: dicts, lists, numbers, strings, bytes) and
  ``restore(self, state)``.
* optional class attribute ``raises_alarms = True``: its output counts as alarms.
* optional class attribute ``stateless = True``: ``process`` keeps no state and works on any
  part of a batch, so a batch that raises is retried in halves down to the bad records, which
  become dead letters, and a call that overruns ``timeout`` is replaced by a fresh instance.

Every call runs in the stage's own thread (`plugin_calls.Worker`) and may take at most the
stage's ``timeout:`` (default 1 s); see docs/plugins.md, "Failures and time".

A class that subclasses `edgewise.pipeline.component.Operator` may be named here too; it is then
built as a built-in operator would be, its ``options`` validated by its own ``Config``.
Operators registered in the ``edgewise.operators`` entry-point group are used directly by their
registered name (``type: <name>``) and must be `Operator` subclasses; `check_operator_class`
tells whether one is.

The spec loader's ``load_code=False`` (the control plane) checks ``class`` by its form only
(`check_import_path`) and leaves ``options`` to the node: nothing is imported there.

Problems a user can cause are `ConfigError`\\s: a bad import path, a module that fails to import,
a class without ``process``, options the class refuses (all reported when the spec is loaded,
except the last, reported when the pipeline starts), and, at run time, a plugin that raises or
returns something other than the types above, or does not return in time (`PluginError`, with
the stage named; the engine then commits nothing of the batch and the run ends).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import weakref
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from edgewise.errors import ConfigError
from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import (
    ComponentConfig,
    DeadLetter,
    Emit,
    Operator,
    RunContext,
    loads_code,
)
from edgewise.pipeline.operators.plugin_calls import (
    MAX_PAYLOAD,
    Overrun,
    Worker,
    halves,
    merge,
    record_lines,
)
from edgewise.pipeline.units import Duration

log = logging.getLogger(__name__)

OPTIONAL_METHODS = ("on_timer", "flush", "snapshot", "restore")
STARTUP_S = 30.0  # budget of __init__ and restore (at least the stage's timeout)
MAX_ABANDONED = 4  # a stateless stage with more abandoned calls still running stops the run


class PluginError(ConfigError):
    """A user operator failed to load, to start, or broke the plugin interface while running."""


def check_import_path(path: str) -> tuple[str, str]:
    """``(module, attribute)`` of ``"package.module:ClassName"``, checked by its form only
    (nothing is imported); `PluginError` if it is not one."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr or not all(
        p.isidentifier() for p in (*module_name.split("."), *attr.split("."))
    ):
        raise PluginError(
            f"{path!r} is not an import path; write it as 'package.module:ClassName'"
        )
    return module_name, attr


def load_user_class(path: str) -> type:
    """Import ``"package.module:ClassName"`` and check it is usable as an operator.

    Raises `PluginError` with a message meant for the person who wrote the pipeline.
    """
    module_name, attr = check_import_path(path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PluginError(
            f"cannot import {module_name!r}: {exc} (install the package into this Python "
            "environment or put its folder on PYTHONPATH)"
        ) from None
    except Exception as exc:  # the user's module failed while importing
        raise PluginError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"module {module_name!r} has no {attr!r}") from None
    if not inspect.isclass(obj):
        raise PluginError(f"{path!r} is a {type(obj).__name__}, not a class")
    if issubclass(obj, Operator):
        check_operator_class(obj, path)
        return obj
    if not callable(getattr(obj, "process", None)):
        raise PluginError(
            f"class {path!r} has no process(batch) method; a user operator must define it"
        )
    for name in OPTIONAL_METHODS:
        if hasattr(obj, name) and not callable(getattr(obj, name)):
            raise PluginError(f"class {path!r}: {name} must be a method")
    return obj


def check_operator_class(cls: Any, name: str) -> None:
    """Check that ``cls`` can be used as an operator type (e.g. one from an entry point)."""
    if not (inspect.isclass(cls) and issubclass(cls, Operator)):
        raise PluginError(
            f"operator {name!r} is {cls!r}, not a subclass of edgewise.pipeline.component."
            "Operator; entry points in 'edgewise.operators' must name Operator subclasses "
            "(or use type: python with class: for plain classes)"
        )
    if cls.process is Operator.process:
        raise PluginError(f"operator {name!r} ({cls.__qualname__}) does not implement process()")
    config = getattr(cls, "Config", None)
    if not (inspect.isclass(config) and issubclass(config, ComponentConfig)):
        raise PluginError(
            f"operator {name!r} ({cls.__qualname__}): Config must be a ComponentConfig subclass"
        )


class PythonConfig(ComponentConfig):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_: str = Field(alias="class", description="the user class, as package.module:ClassName")
    options: dict[str, Any] = Field(default={}, description="handed to the class's __init__")
    timeout: Duration = 1.0
    """Longest a call of the class may take; a longer one is abandoned (docs/plugins.md)."""

    @field_validator("timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("timeout must be more than 0")
        return v

    @field_validator("class_")
    @classmethod
    def _loadable(cls, v: str, info: ValidationInfo) -> str:
        try:
            if loads_code(info.context):
                load_user_class(v)
            else:  # the control plane: its form only, whatever is installed there
                check_import_path(v)
        except PluginError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("options")
    @classmethod
    def _native_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        path = info.data.get("class_")
        # the class failed (reported already), or the node checks them when it loads it
        if path is None or not loads_code(info.context):
            return v
        user = load_user_class(path)
        if issubclass(user, Operator):
            try:
                user.Config.model_validate(v)
            except ValidationError as exc:
                raise ValueError(_describe(exc, f"options of {path}")) from None
        return v


def _describe(exc: ValidationError, what: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return f"{what}: " + "; ".join(parts)


class PythonOperator(Operator):
    """Runs a user class behind the operator contract: in its own thread, each call within the
    stage's ``timeout``, checking what it returns. A class that declares ``stateless = True``
    has a batch that raised retried in halves down to the bad records (dead letters), and a
    call that overran replaced by a fresh instance (its batch dead-lettered); any other class
    fails the run on either (the engine then commits nothing of the batch)."""

    Config = PythonConfig

    def __init__(self, id: str, config: PythonConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self._cls = load_user_class(config.class_)
        self.name = config.class_
        self.native = issubclass(self._cls, Operator)
        self.stateless = getattr(self._cls, "stateless", False) is True
        self.timeout = config.timeout
        self.abandoned = 0  # calls given up on because they overran the timeout
        self._late: list[Worker] = []  # retired workers whose abandoned call still runs
        self._broken: str | None = None  # why the stage cannot be called any more
        self._worker = Worker(f"plugin-{id}")
        self._current = [self._worker]  # for the finaliser, which must not hold self
        weakref.finalize(self, _retire, self._current)
        self.inner: Any = self._build()
        self.raises_alarms = bool(getattr(self.inner, "raises_alarms", False))
        self._snapshot_checked = False

    def _build(self) -> Any:
        cls, options, budget = self._cls, self.config.options, max(self.timeout, STARTUP_S)
        try:
            if self.native:
                cfg = cls.Config.model_validate(options)
                return self._worker.call(budget, cls, self.id, cfg, self.ctx)
            return self._worker.call(budget, cls, dict(options))
        except ValidationError as exc:  # pragma: no cover - checked when the spec was loaded
            raise PluginError(f"stage {self.id!r}: " + _describe(exc, self.name)) from None
        except Overrun:
            raise PluginError(
                f"stage {self.id!r}: {self.name}() did not return within {budget:g} s"
            ) from None
        except Exception as exc:
            raise PluginError(
                f"stage {self.id!r}: {self.name} rejected its options {dict(options)!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    @property
    def abandoned_running(self) -> int:
        """Abandoned calls that have not returned yet (each holds a thread)."""
        self._late = [w for w in self._late if w.alive]
        return len(self._late)

    def _call(self, method: str, *args: Any, budget: float | None = None) -> Any:
        if self._broken is not None:
            raise PluginError(self._broken)
        fn = getattr(self.inner, method, None)
        if fn is None:
            return None
        budget = budget or self.timeout
        try:
            return self._worker.call(budget, fn, *args)
        except Overrun:
            self._overran(method, budget, None)
            return None
        except Exception as exc:
            if self.native:
                raise
            raise self._raised(method, exc) from exc

    def _raised(self, method: str, exc: Exception) -> PluginError:
        return PluginError(
            f"stage {self.id!r}: {self.name}.{method}() raised {type(exc).__name__}: {exc}"
        )

    def _overran(self, method: str, budget: float, batch: Batch | None) -> None:
        """A call overran: retire its thread; a stateless stage goes on with a fresh instance
        (the batch to dead letters), any other stage stops the run."""
        self.abandoned += 1
        self._worker.retire()
        self._late.append(self._worker)
        late = f"{self.name}.{method}() did not return within {budget:g} s"
        if not self.stateless:
            self._broken = (
                f"stage {self.id!r}: {late}; the call was abandoned and the run stops (a stage "
                "with state cannot skip a call)"
            )
            raise PluginError(self._broken)
        if self.abandoned_running > MAX_ABANDONED:
            self._broken = (
                f"stage {self.id!r}: {late}, and {self.abandoned_running - 1} earlier abandoned "
                "calls have not returned either; the run stops"
            )
            raise PluginError(self._broken)
        log.warning("stage %s: %s; abandoned, a fresh instance goes on", self.id, late)
        self._worker = self._current[0] = Worker(f"plugin-{self.id}")
        self.inner = self._build()
        if batch is not None:
            lines = record_lines(batch)
            self._dead(
                f"stage {self.id!r}: {late} on {batch.n} record{'s' if batch.n != 1 else ''}; "
                "the call was abandoned (records in the payload, one JSON line each)",
                lines,
            )

    def _dead(self, reason: str, payload: bytes) -> None:
        report = self.ctx.dead_letter
        if report is None:
            log.warning("stage %s: dead letter outside an engine: %s", self.id, reason)
            return
        report(DeadLetter(self.id, reason, payload[:MAX_PAYLOAD], len(payload)))

    def _isolated(self, batch: Batch) -> Emit:
        """`process` of a stateless class: a batch that raises is retried in halves down to the
        records that raise on their own, which become dead letters."""
        results: list[Emit] = []

        def run(part: Batch) -> None:
            try:
                out = self._worker.call(self.timeout, self.inner.process, part)
            except Overrun:
                self._overran("process", self.timeout, part)
                return
            except Exception as exc:
                if part.n > 1:
                    for half in halves(part):
                        run(half)
                elif part.n == 1:
                    err = self._raised("process", exc)
                    self._dead(str(err), record_lines(part).rstrip(b"\n"))
                return
            results.append(self._checked("process", out))

        if self._broken is not None:
            raise PluginError(self._broken)
        run(batch)
        return results[0] if len(results) == 1 else merge(results)

    def _checked(self, method: str, result: Any) -> Emit:
        if result is None or self.native:
            return result
        if isinstance(result, Batch):
            self._check_batch(method, "", result)
            return result
        if isinstance(result, dict):
            for port, b in result.items():
                if port not in self.ports:
                    raise PluginError(
                        f"stage {self.id!r}: {self.name}.{method}() returned port {port!r}; a "
                        "type: python stage has only the port 'out' (register an Operator "
                        "subclass under the 'edgewise.operators' entry point for more ports)"
                    )
                if b is not None:
                    if not isinstance(b, Batch):
                        raise PluginError(
                            f"stage {self.id!r}: {self.name}.{method}() returned "
                            f"{type(b).__name__} for port {port!r}; expected a Batch or None"
                        )
                    self._check_batch(method, f" for port {port!r}", b)
            return result
        raise PluginError(
            f"stage {self.id!r}: {self.name}.{method}() returned {type(result).__name__}; "
            "return a Batch, a dict {'out': Batch} or None"
        )

    def _check_batch(self, method: str, where: str, batch: Batch) -> None:
        for name, col in batch.columns.items():
            if not isinstance(col, np.ndarray) or col.shape != (batch.n,):
                raise PluginError(
                    f"stage {self.id!r}: {self.name}.{method}() returned a Batch{where} whose "
                    f"column {name!r} is not a numpy array of its {batch.n} records"
                )

    def process(self, batch: Batch) -> Emit:
        if self.stateless:
            return self._isolated(batch)
        return self._checked("process", self._call("process", batch))

    def on_timer(self, idle_s: float) -> Emit:
        return self._checked("on_timer", self._call("on_timer", idle_s))

    def flush(self) -> Emit:
        return self._checked("flush", self._call("flush"))

    def snapshot(self) -> Any:
        state = self._call("snapshot")
        if not self._snapshot_checked and not self.native:
            try:
                ckpt.pack(state)
            except (TypeError, ValueError, OverflowError) as exc:
                raise PluginError(
                    f"stage {self.id!r}: {self.name}.snapshot() returned state that cannot be "
                    f"checkpointed ({exc}); use dicts, lists, numbers, strings and bytes"
                ) from None
            self._snapshot_checked = True
        return state

    def restore(self, state: Any) -> None:
        if state is None:
            return
        self._call("restore", state, budget=max(self.timeout, STARTUP_S))


def _retire(current: list[Worker]) -> None:
    current[0].retire()
