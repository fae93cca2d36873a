"""The three kinds of pipeline components and their contracts.

* `Operator` (a stage): takes a batch, returns batches per output port. Pure and synchronous; it
  must not block or do I/O. Its state is returned by `snapshot()` as plain data (dicts, lists,
  numbers, strings, bytes) and committed with the outbox so a crash neither loses nor repeats it.
* `Source`: an async producer. It hands batches to the engine with `SourceOutput.emit`, which
  waits when the engine is behind (backpressure), and reports bad input with
  `SourceOutput.dead_letter`. The position it gives with each batch (file offset, message ids) is
  committed atomically with the records the batch produced; `ack()` is called after that commit.
* `Sink`: a local action or output. `write()` must be quick: hand the batch to a client library's
  queue or to a bounded background task; never wait on the network.

Each component declares its parameters as a pydantic model in ``Config``; the spec loader
validates the YAML against it and reports errors with file and line. A parameter that names a
file the component opens is typed `FilePath`, and the component opens `ComponentConfig.file_path`
of it: for a pipeline from the control plane that is the path the spec loader confined to the
node's allowed folders (`edgewise.pipeline.paths`, docs/security.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr

from edgewise.outbox.records import DeadLetter
from edgewise.pipeline.batch import Batch

Emit = dict[str, Batch] | Batch | None

LOAD_CODE = "load_code"
"""Key of the pydantic validation context the spec loader passes to every ``Config``: False when
it must not import user code (the control plane validating a pushed pipeline), so validators
check references to user code by their form only (docs/plugins.md)."""


def loads_code(context: Any) -> bool:
    """Whether a validator given ``info.context`` may import user code (True unless told not)."""
    return not (isinstance(context, dict) and context.get(LOAD_CODE) is False)


class PathField:
    """Marks a parameter as a filesystem path the component opens (see `FilePath`)."""

    def __repr__(self) -> str:
        return "PathField()"


FilePath = Annotated[str, PathField()]
"""A parameter naming a file on the node. Pipelines from the control plane may only name files
inside the node's allowed folders; the spec loader checks every `FilePath` (also ``FilePath |
None``) of a ``Config`` and of the `ComponentConfig` models nested in it."""


class ComponentConfig(BaseModel):
    """Base for every component's parameters: unknown keys are errors (typos get caught).

    Each parameter is documented by the docstring written under it; `edgewise.pipeline.reference`
    reads them from the source when it lists the components. (pydantic's
    ``use_attribute_docstrings`` would read them on every import, about 25 ms of start-up.)"""

    model_config = ConfigDict(extra="forbid", frozen=True)
    _resolved: dict[str, Path] = PrivateAttr(default_factory=dict)
    """`FilePath` parameters the spec loader resolved and confined (pipelines from the cloud);
    not part of the config's digest (model_dump leaves private attributes out)."""

    def file_path(self, name: str, base: Path) -> Path:
        """The file `FilePath` parameter ``name`` names: the path the spec loader confined (a
        pipeline from the control plane: absolute, symlinks resolved, inside an allowed
        folder), else the value as written, relative to ``base``."""
        confined = self._resolved.get(name)
        if confined is not None:
            return confined
        path = Path(getattr(self, name))
        return path if path.is_absolute() else base / path


@dataclass
class RunContext:
    """What a component may know about the run it is part of."""

    pipeline: str
    data_dir: Path
    spec_dir: Path = field(default_factory=Path.cwd)
    metrics: dict[str, Any] = field(default_factory=dict)
    dead_letter: Callable[[DeadLetter], None] | None = None
    """Where a stage reports input it could not process (the engine commits it with the
    position of the batch it came in); None outside an engine."""


class Operator:
    """A pipeline stage. Subclasses set ``Config`` and implement `process`."""

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    ports: ClassVar[tuple[str, ...]] = ("out",)

    def __init__(self, id: str, config: Any, ctx: RunContext) -> None:
        self.id = id
        self.config = config
        self.ctx = ctx

    def process(self, batch: Batch) -> Emit:
        raise NotImplementedError

    def on_timer(self, idle_s: float) -> Emit:
        """Called about every 100 ms; ``idle_s`` is the wall time since the last input."""
        return None

    def flush(self) -> Emit:
        """End of a finite input: emit whatever is still held."""
        return None

    def snapshot(self) -> Any:
        return None

    def restore(self, state: Any) -> None:
        return None


class SourceOutput:
    """How a source talks to the engine."""

    def __init__(
        self,
        emit: Callable[[Batch, Any], Awaitable[None]],
        dead: Callable[[DeadLetter], None],
        source_id: str,
        max_payload: int = 4096,
    ) -> None:
        self._emit = emit
        self._dead = dead
        self._source_id = source_id
        self._max_payload = max_payload

    async def emit(self, batch: Batch, position: Any = None) -> None:
        """Hand a batch to the engine; waits while the engine is behind."""
        await self._emit(batch, position)

    def dead_letter(self, reason: str, payload: bytes | str) -> None:
        """Record input that could not be used. Only the first 4 KiB of the payload are kept."""
        raw = payload.encode("utf-8", "replace") if isinstance(payload, str) else bytes(payload)
        self._dead(DeadLetter(self._source_id, reason, raw[: self._max_payload], len(raw)))


class Source:
    """A producer of batches. ``finite`` sources end the run when they are exhausted."""

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    finite: bool = False

    def __init__(self, id: str, config: Any, ctx: RunContext) -> None:
        self.id = id
        self.config = config
        self.ctx = ctx

    def restore(self, position: Any) -> None:
        """Continue after ``position`` (the last committed one) instead of from the start."""
        return None

    def ack(self, position: Any) -> None:
        """Everything up to ``position`` is durably committed."""
        return None

    async def run(self, out: SourceOutput) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}


class Sink:
    """A consumer of batches. Use as an async context manager around the run."""

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, id: str, config: Any, ctx: RunContext) -> None:
        self.id = id
        self.config = config
        self.ctx = ctx
        self.written = 0
        self.errors = 0

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def write(self, batch: Batch) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {"written": self.written, "errors": self.errors}
