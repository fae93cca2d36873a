"""Where component types are found: built-ins by name, user operators by import path.

Built-ins are listed as ``"module:Class"`` strings and imported only when a spec uses them, so a
pipeline that never talks OPC UA never pays for importing it. User operators come from the
``edgewise.operators`` entry-point group or from ``type: python`` with ``class: pkg.mod:Class``
(see docs/plugins.md).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from edgewise.errors import ConfigError

P = "edgewise.pipeline"

SOURCES: dict[str, str] = {
    "simulator": f"{P}.sources.simulator:SimulatorSource",
    "file": f"{P}.sources.file:FileSource",
    "mqtt": f"{P}.sources.mqtt:MqttSource",
    "http": f"{P}.sources.http:HttpSource",
    "modbus": f"{P}.sources.modbus:ModbusSource",
    "opcua": f"{P}.sources.opcua:OpcUaSource",
}

OPERATORS: dict[str, str] = {
    "filter": f"{P}.operators.filter:Filter",
    "map": f"{P}.operators.map:Map",
    "window": f"{P}.operators.window:Window",
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


def known(kind: str) -> list[str]:
    names = set(KINDS[kind])
    if kind == "operator":
        names.update(ep.name for ep in entry_points(group="edgewise.operators"))
    return sorted(names)


def resolve(kind: str, type_name: str) -> type:
    """The class implementing component ``type_name`` of ``kind`` (source, operator, sink)."""
    table = KINDS[kind]
    if type_name in table:
        return load_object(table[type_name])
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
