"""Serialising engine state (operator snapshots, source positions) for the outbox checkpoint."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import numpy as np


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def pack(value: Any) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def config_digest(config: Any) -> str:
    """A stable fingerprint of a component's config: state is restored only if it matches."""
    try:
        text = config.model_dump_json()
    except AttributeError:
        text = repr(config)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
