"""Data out, the settings: the ``forwarders`` and ``retention`` mapping, validated.

E.g. from ``edgewise cloud serve --data-out FILE`` (`load_data_out`) or a mapping
(`data_out_config`)::

    forwarders:
      - type: mqtt
        host: 127.0.0.1
        port: 1883
        topic: "edgewise/{node}/{stream}"
      - type: nats
        servers: ["nats://127.0.0.1:4222"]
        subject: "edgewise.{node}.{stream}"
        stream_name: EDGEWISE      # JetStream stream, created if missing and create_stream
    retention: 7d

An unknown key, a bad template or a bad value is a `ConfigError` that names the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgewise.cloud.dataout.render import check_template
from edgewise.errors import ConfigError
from edgewise.pipeline.units import Duration


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    per: Literal["record", "chunk"] = "record"
    """One message per record (default) or one per chunk."""
    max_queue: int = Field(default=1000, ge=1)
    """Chunks kept while the broker is unreachable; beyond this the oldest are dropped."""
    retry_min: Duration = Field(default=0.2, gt=0)
    """Longest wait before the first retry (`common.backoff.Backoff` base; full jitter)."""
    retry_max: Duration = Field(default=30.0, gt=0)
    """Longest wait between retries (the backoff's cap)."""
    flush_timeout: Duration = 5.0
    """On stop, how long queued chunks may take to leave."""
    ack_timeout: Duration = 10.0
    """How long the broker may take to acknowledge a chunk before it is sent again."""


class MqttForwardConfig(_Common):
    type: Literal["mqtt"]
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    client_id: str | None = Field(default=None, max_length=64)
    topic: str = "edgewise/{node}/{stream}"
    qos: Literal[0, 1] = 1
    keepalive: int = Field(default=30, ge=5, le=65535)
    connect_timeout: Duration = 5.0

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        check_template(v, "topic")
        if "+" in v or "#" in v:
            raise ValueError(f"topic template {v!r} contains an MQTT wildcard (+ or #)")
        return v


class NatsForwardConfig(_Common):
    type: Literal["nats"]
    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"], min_length=1)
    subject: str = "edgewise.{node}.{stream}"
    stream_name: str = Field(default="EDGEWISE", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """The JetStream stream that holds the subjects."""
    create_stream: bool = True
    """Create the stream (subjects from the template, ``{...}`` → ``*``) if it does not exist."""
    duplicate_window: Duration = 120.0
    """JetStream's dedupe window for ``Nats-Msg-Id`` when the stream is created here."""
    connect_timeout: Duration = 5.0
    max_inflight: int = Field(default=1000, ge=1, le=4000)
    """Messages published before waiting for their acknowledgements."""

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        check_template(v, "subject")
        if any(c in v for c in " *>") or v.startswith(".") or v.endswith(".") or ".." in v:
            raise ValueError(f"subject template {v!r} is not a valid NATS subject")
        return v


ForwarderConfig = Annotated[MqttForwardConfig | NatsForwardConfig, Field(discriminator="type")]


class DataOutConfig(BaseModel):
    """The ``forwarders`` and ``retention`` settings of the control plane."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    forwarders: list[ForwarderConfig] = Field(default_factory=list)
    retention: Duration | None = None
    """Keep stored chunks this long (e.g. '7d'); None keeps them forever."""
    prune_every: Duration = 3600.0


def _config_error(exc: ValidationError, where: str) -> ConfigError:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"{where}: {loc}: {e['msg']}" if loc else f"{where}: {e['msg']}")
    return ConfigError("\n".join(lines))


def data_out_config(
    data: Mapping[str, Any] | None, where: str = "data-out config"
) -> DataOutConfig:
    """Validate the ``forwarders``/``retention`` mapping; raises `ConfigError` naming the field."""
    try:
        return DataOutConfig.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise _config_error(exc, where) from None


def load_data_out(path: str) -> DataOutConfig:
    """Read a YAML/JSON file holding ``forwarders`` and ``retention``."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if doc is not None and not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping with forwarders and retention")
    return data_out_config(doc, path)
