"""Edgewise: process data next to its sources, buffer durably, sync exactly once.

The public surface is small on purpose: the CLI (`edgewise ...`), the pipeline spec loader and
the plugin interface for user operators. Everything else is internal and may change.
"""

from edgewise.errors import ConfigError, EdgewiseError, PeerError, SpecError, TransportError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "EdgewiseError",
    "PeerError",
    "SpecError",
    "TransportError",
    "__version__",
]
