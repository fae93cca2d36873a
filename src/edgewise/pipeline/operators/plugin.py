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

A class that subclasses `edgewise.pipeline.component.Operator` may be named here too; it is then
built as a built-in operator would be, its ``options`` validated by its own ``Config``.
Operators registered in the ``edgewise.operators`` entry-point group are used directly by their
registered name (``type: <name>``) and must be `Operator` subclasses; `check_operator_class`
tells whether one is.

Problems a user can cause are `ConfigError`\\s: a bad import path, a module that fails to import,
a class without ``process``, options the class refuses (all reported when the spec is loaded,
except the last, reported when the pipeline starts), and, at run time, a plugin that raises or
returns something other than the types above (`PluginError`, with the stage named).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from edgewise.errors import ConfigError
from edgewise.pipeline import checkpoint as ckpt
from edgewise.pipeline.batch import Batch
from edgewise.pipeline.component import ComponentConfig, Emit, Operator, RunContext

OPTIONAL_METHODS = ("on_timer", "flush", "snapshot", "restore")


class PluginError(ConfigError):
    """A user operator failed to load, to start, or broke the plugin interface while running."""


def load_user_class(path: str) -> type:
    """Import ``"package.module:ClassName"`` and check it is usable as an operator.

    Raises `PluginError` with a message meant for the person who wrote the pipeline.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr or not all(
        p.isidentifier() for p in (*module_name.split("."), *attr.split("."))
    ):
        raise PluginError(
            f"{path!r} is not an import path; write it as 'package.module:ClassName'"
        )
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

    @field_validator("class_")
    @classmethod
    def _loadable(cls, v: str) -> str:
        try:
            load_user_class(v)
        except PluginError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("options")
    @classmethod
    def _native_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        path = info.data.get("class_")
        if path is None:  # the class itself failed; that is reported already
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
    """Runs a user class behind the operator contract, checking what it returns."""

    Config = PythonConfig

    def __init__(self, id: str, config: PythonConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        cls = load_user_class(config.class_)
        self.name = config.class_
        self.native = issubclass(cls, Operator)
        try:
            if self.native:
                self.inner: Any = cls(id, cls.Config.model_validate(config.options), ctx)
            else:
                self.inner = cls(dict(config.options))
        except ValidationError as exc:  # pragma: no cover - checked when the spec was loaded
            raise PluginError(f"stage {id!r}: " + _describe(exc, self.name)) from None
        except Exception as exc:
            raise PluginError(
                f"stage {id!r}: {self.name} rejected its options {dict(config.options)!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.raises_alarms = bool(getattr(self.inner, "raises_alarms", False))
        self._snapshot_checked = False

    def _call(self, method: str, *args: Any) -> Any:
        fn = getattr(self.inner, method, None)
        if fn is None:
            return None
        if self.native:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as exc:
            raise PluginError(
                f"stage {self.id!r}: {self.name}.{method}() raised {type(exc).__name__}: {exc}"
            ) from exc

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
        self._call("restore", state)
