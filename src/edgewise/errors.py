"""The exception tree of Edgewise, split by who has to act.

    EdgewiseError                 root: catch this to catch everything we raise
    ├── ConfigError               the user's input is wrong (CLI flag, YAML file, plugin path,
    │   │                         a request to one of our HTTP APIs)
    │   ├── SpecError             a pipeline or workload file failed validation; knows file,
    │   │                         line, field and the fix
    │   ├── BadRequest            a request is malformed or invalid as sent (HTTP 400)
    │   ├── NotFound              a request names a node, token or version that does not exist
    │   │                         (HTTP 404)
    │   └── MissingExtra          a part of Edgewise was imported without its optional
    │                             dependencies (``pip install 'edgewise[cloud]'``); also an
    │                             ImportError, so ``import edgewise.cloud`` fails as imports do
    ├── PeerError                 the other side sent something wrong (bad batch, bad reply)
    │   └── UpdateRefused         release metadata or a release file failed TUF verification
    │                             (rollback, freeze, mix-and-match, bad hash or length,
    │                             bad signatures): nothing of it was used
    ├── TransportError            the network failed us (refused, reset, timed out)
    ├── StorageError              the local store (outbox database) failed
    ├── NodeDecommissioned        the control plane decommissioned this node: the agent stops
    │                             and will not start again without a new enrolment token
    └── ConstraintsUnmet          a plan does not meet the workload's constraints
                                  (``edgewise plan --strict``)

Messages are written for people running edge fleets: what went wrong, where, what to do.

`BadRequest` and `NotFound` are the input's fault whichever side sees them: the control plane
raises them about a request (``edgewise.cloud.http_errors`` answers 400 / 404), and the operator
client raises `NotFound` for a 404 answer, so the CLI exits with 2 (change your input).
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


class BadRequest(ConfigError):
    """A request is malformed or invalid as sent (not JSON, a field missing or of the wrong
    type, contradictory values); the message names what to change."""


class NotFound(ConfigError):
    """A request names something that does not exist: a node, a token, a desired version."""


class MissingExtra(ConfigError, ImportError):
    """A part of Edgewise needs an extra that is not installed (the base install is the edge
    node; the control plane is ``edgewise[cloud]``, the planner ``edgewise[plan]``). The message
    names the extra and the pip command."""


class PeerError(EdgewiseError):
    """The remote side sent data we cannot accept."""


class UpdateRefused(PeerError):
    """Release metadata or a release file failed verification; nothing of it was used."""


class TransportError(EdgewiseError):
    """The network failed: connection refused, reset or timed out."""


class StorageError(EdgewiseError):
    """The local store failed (disk full, database corrupt, permission denied)."""


class NodeDecommissioned(EdgewiseError):
    """The control plane decommissioned this node (`edgewise node decommission`): the agent
    stops, and refuses to start again until it is given a new enrolment token. The CLI exits
    with its own code for it (`edgewise.cli.common.EXIT_DECOMMISSIONED`), so a supervisor can be
    told not to restart it."""


class ConstraintsUnmet(EdgewiseError):
    """A plan does not meet its workload's requirements or hard constraints and the caller
    asked to be strict (`edgewise plan --strict`); the message names the first unmet check with
    the number that fails it. The CLI exits with its own code (`edgewise.cli.common.EXIT_UNMET`).
    """
