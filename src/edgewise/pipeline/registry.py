"""Where component types are found: built-ins by name, user operators by import path.

Built-ins are listed as ``"module:Class"`` strings and imported only when a spec uses them, so a
pipeline that never talks OPC UA never pays for importing it. User operators come from the
``edgewise.operators`` entry-point group or from ``type: python`` with ``class: pkg.mod:Class``
(see docs/plugins.md).

With ``load_code=False`` (the control plane) nothing but built-ins is imported and the
``edgewise.operators`` entry points are not even listed: an operator type that is not built in
stands for an entry point of the node if it has the form of an entry-point name
(`PLUGIN_NAME`), and is returned as `Unloaded`.
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points
from typing import Any

from pydantic import ConfigDict

from edgewise.errors import ConfigError
from edgewise.pipeline.component import ComponentConfig, Operator, RunContext

P = "edgewise.pipeline"

SOURCES: dict[str, str] = {
    "simulator": f"{P}.sources.simulator:SimulatorSource",
    "file": f"{P}.sources.file:FileSource",
    "mqtt": f"{P}.sources.mqtt:MqttSource",
    "http": f"{P}.sources.http:HttpSource",
    "modbus": f"{P}.sources.modbus:ModbusSource",
    "opcua": f"{P}.sources.opcua:OpcUaSource",
    "stream": f"{P}.sources.stream:StreamSource",
}

OPERATORS: dict[str, str] = {
    "filter": f"{P}.operators.filter:Filter",
    "map": f"{P}.operators.map:Map",
    "window": f"{P}.operators.window:Window",
    "partial": f"{P}.operators.partial:Partial",
    "combine": f"{P}.operators.combine:Combine",
    "deadband": f"{P}.operators.deadband:Deadband",
    "threshold": f"{P}.operators.threshold:Threshold",
    "rate_of_change": f"{P}.operators.rate:RateOfChange",
    "anomaly": f"{P}.operators.anomaly:Anomaly",
    "downsample": f"{P}.operators.downsample:Downsample",
    "fft": f"{P}.operators.fft:FftBands",
    "python": f"{P}.operators.plugin:PythonOperator",
}

SINKS: dict[str, str] = {
    "outbox": f"{P}.sinks.outbox:OutboxSink",
    "mqtt": f"{P}.sinks.mqtt:MqttSink",
    "webhook": f"{P}.sinks.webhook:WebhookSink",
    "file": f"{P}.sinks.file:FileSink",
    "log": f"{P}.sinks.log:LogSink",
}

KINDS = {"source": SOURCES, "operator": OPERATORS, "sink": SINKS}

PLUGIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
"""The form of an entry-point operator type the control plane accepts without loading it: a
letter, then letters, digits, '_', '-' or '.'; at most 64 characters."""


class UnloadedConfig(ComponentConfig):
    """The parameters of an `Unloaded` operator, kept as given (checked on the node)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Unloaded(Operator):
    """An entry-point operator the spec loader did not load (``load_code=False``): it stands
    in the `PipelineSpec` for validation only and cannot run."""

    Config = UnloadedConfig

    def __init__(self, id: str, config: Any, ctx: RunContext) -> None:
        raise ConfigError(f"stage {id!r}: its operator was validated without loading code "
                          "(the control plane's check); parse the pipeline with load_code=True "
                          "to run it")


def load_object(path: str) -> Any:
    """Import ``"package.module:Name"``; raise `ConfigError` with a readable message."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{path!r} is not an import path; write it as 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no {attr!r}") from None


def known(kind: str, *, load_code: bool = True) -> list[str]:
    """The type names of ``kind``: built-ins, and (``load_code``) installed operator plugins."""
    names = set(KINDS[kind])
    if kind == "operator" and load_code:
        names.update(ep.name for ep in entry_points(group="edgewise.operators"))
    return sorted(names)


def resolve(kind: str, type_name: str, *, load_code: bool = True) -> type:
    """The class implementing component ``type_name`` of ``kind`` (source, operator, sink).

    Raises `KeyError` for an unknown type, `ConfigError` for a plugin that fails to load or
    (``load_code=False``) an operator type that is not built in and not an entry-point name.
    """
    table = KINDS[kind]
    if type_name in table:
        return load_object(table[type_name])
    if kind == "operator" and not load_code:
        if PLUGIN_NAME.fullmatch(type_name):
            return Unloaded
        builtins = ", ".join(known(kind, load_code=False))
        raise ConfigError(
            f"unknown operator type {type_name!r}: neither built in ({builtins}) nor the name "
            "of a plugin (an entry point in 'edgewise.operators': a letter, then letters, "
            "digits, '_', '-' or '.', at most 64 characters)")
    if kind == "operator":
        for ep in entry_points(group="edgewise.operators"):
            if ep.name == type_name:
                try:
                    cls = ep.load()
                except Exception as exc:  # a broken plugin install is the user's to fix
                    raise ConfigError(
                        f"operator {type_name!r} is registered as {ep.value!r} by an installed "
                        f"package, but loading it failed: {exc}"
                    ) from None
                from edgewise.pipeline.operators.plugin import check_operator_class

                check_operator_class(cls, type_name)
                return cls
    raise KeyError(type_name)
