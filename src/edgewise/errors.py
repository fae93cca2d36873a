"""The exception tree of Edgewise, split by who has to act.

    EdgewiseError                 root: catch this to catch everything we raise
    ├── ConfigError               the user's input is wrong (CLI flag, YAML file, plugin path)
    │   └── SpecError             a pipeline or workload file failed validation; knows file,
    │                             line, field and the fix
    ├── PeerError                 the other side sent something wrong (bad batch, bad reply)
    ├── TransportError            the network failed us (refused, reset, timed out)
    └── StorageError              the local store (outbox database) failed

Messages are written for people running edge fleets: what went wrong, where, what to do.
"""

from __future__ import annotations


class EdgewiseError(Exception):
    """Root of every error Edgewise raises on purpose."""


class ConfigError(EdgewiseError):
    """The user's configuration or command line is wrong."""


class SpecError(ConfigError):
    """A spec file failed validation.

    Each problem is one line: ``file:line: field: message (fix)``.
    """

    def __init__(self, path: str, problems: list[tuple[int | None, str, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = []
        for line, field, message in problems:
            where = f"{path}:{line}" if line else path
            lines.append(f"{where}: {field}: {message}" if field else f"{where}: {message}")
        super().__init__("\n".join(lines))


class PeerError(EdgewiseError):
    """The remote side sent data we cannot accept."""


class TransportError(EdgewiseError):
    """The network failed: connection refused, reset or timed out."""


class StorageError(EdgewiseError):
    """The local store failed (disk full, database corrupt, permission denied)."""
