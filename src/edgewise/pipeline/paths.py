"""Where a pipeline from the control plane may read and write files on the node.

A component parameter typed `FilePath` (`edgewise.pipeline.component`) names a file the
component opens: the file source's and the file sink's ``path``, and any such parameter of an
operator plugin's ``Config``. The node parses a pipeline that came from the cloud with a
`Confinement` (`edgewise.edge.twin`): every such path is taken relative to ``base`` (the node's
``DATA/pipelines``), resolved (``..`` and symlinks, as the kernel would follow them) and must lie
inside ``base`` or inside one of the folders the node's own operator allowed (``edgewise agent
run --allow-path DIR``). The resolved path is kept in the config (`ComponentConfig.file_path`),
so the component opens exactly the file that was checked. A path outside is a spec error that
names the field and the allowed folders; the pipeline is refused before anything is created.

Pipelines given on the node itself (``edgewise run FILE``, ``agent run --pipeline FILE``) are
the node operator's own and are not confined. See docs/security.md, *Pipelines from the
control plane*.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic.fields import FieldInfo

from edgewise.errors import ConfigError
from edgewise.pipeline.component import ComponentConfig, PathField

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Confinement:
    """The folders files of a pipeline from the control plane may be in: ``base`` (relative
    paths are taken from it) and ``allowed`` (given by the node's operator)."""

    base: Path
    allowed: tuple[Path, ...] = ()

    def roots(self) -> list[Path]:
        """Every allowed folder, resolved (symlinks followed), without repeats."""
        out: list[Path] = []
        for root in (self.base, *self.allowed):
            real = Path(root).resolve()
            if real not in out:
                out.append(real)
        return out

    def resolve(self, value: str) -> Path:
        """The real path ``value`` names; `ValueError` (with the reason) unless it lies inside
        one of `roots`."""
        try:
            path = Path(value)
            real = (path if path.is_absolute() else self.base / path).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # NUL byte, symlink loop
            raise ValueError(f"{value!r} is not a usable path ({exc}); {self._fix()}") from None
        roots = self.roots()
        if any(real.is_relative_to(root) for root in roots):
            return real
        shown = "" if str(real) == value else f" (it resolves to {real})"
        raise ValueError(f"{value!r} is outside the folders this node allows for pipelines "
                         f"from the control plane{shown}; {self._fix()}")

    def _fix(self) -> str:
        roots = ", ".join(str(r) for r in self.roots())
        return (f"allowed: {roots}; name a file inside one of them (relative paths are taken "
                f"from {self.roots()[0]}), or allow its folder on the node with "
                "`edgewise agent run --allow-path DIR`")


def check_allowed_roots(data_dir: Path, roots: Sequence[Path]) -> None:
    """`ConfigError` for an ``--allow-path`` that holds the node's data directory or lies in it
    (its key, outbox and state are never for pipelines from the cloud; DATA/pipelines is
    allowed anyway)."""
    data = data_dir.resolve()
    for root in roots:
        real = root.resolve()
        if data.is_relative_to(real) or real.is_relative_to(data):
            where = "holds" if data.is_relative_to(real) else "is inside"
            raise ConfigError(
                f"--allow-path {root}: it {where} the node's data directory {data} (node key, "
                "outbox, state), which pipelines from the control plane must not reach; allow "
                f"a folder beside it ({data / 'pipelines'} is allowed anyway)")


def is_path_field(field: FieldInfo) -> bool:
    """Whether ``field`` is typed `FilePath` (or ``FilePath | None``)."""
    if any(isinstance(m, PathField) for m in field.metadata):
        return True
    return _marked(field.annotation)


def _marked(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        args = get_args(annotation)
        return any(isinstance(m, PathField) for m in args[1:]) or _marked(args[0])
    return any(_marked(a) for a in get_args(annotation))


def path_fields(config: ComponentConfig, loc: Loc = ()) -> Iterator[tuple[Loc, ComponentConfig,
                                                                           str, str]]:
    """``(location, model, field name, value)`` of every `FilePath` set in ``config`` and in
    the `ComponentConfig` models nested in it (directly, in lists or in dict values)."""
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        here = (*loc, field.alias or name)
        if isinstance(value, str) and is_path_field(field):
            yield here, config, name, value
            continue
        items: list[tuple[str | int, Any]] = []
        if isinstance(value, ComponentConfig):
            yield from path_fields(value, here)
        elif isinstance(value, (list, tuple)):
            items = list(enumerate(value))
        elif isinstance(value, dict):
            items = [(k, v) for k, v in value.items() if isinstance(k, str)]
        for key, item in items:
            if isinstance(item, ComponentConfig):
                yield from path_fields(item, (*here, key))


def confine(config: Any, confinement: Confinement) -> list[tuple[Loc, str]]:
    """Check every `FilePath` of ``config`` against ``confinement``; keep the resolved paths in
    the config for the component to open. Returns ``(location, message)`` per violation."""
    problems: list[tuple[Loc, str]] = []
    if not isinstance(config, ComponentConfig):
        return problems
    for loc, model, name, value in path_fields(config):
        try:
            model._resolved[name] = confinement.resolve(value)
        except ValueError as exc:
            problems.append((loc, str(exc)))
    return problems
