"""Validating a slot's pipelines with the project's own spec parser, in or out of the agent.

``python -m edgewise.edge.updater.check --base FILES [--allow DIR]... PIPELINE...`` is what
`edgewise.edge.updater.stage` runs, with the slot's ``site/`` on ``PYTHONPATH``, for a release
with plugins: their code (and a plugin that raises on import) is loaded in that child, never in
the running agent. Exit 0 when every pipeline validates; else 1 with the problems on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from edgewise.errors import ConfigError
from edgewise.pipeline.paths import Confinement
from edgewise.pipeline.spec import PipelineSpec, parse_pipeline

MAX_PIPELINE_BYTES = 1 << 20


def parse_one(path: Path, base: Path, allowed: Sequence[Path] = ()) -> PipelineSpec:
    """Parse the pipeline file ``path`` of a slot; relative paths from ``base`` (the slot's
    files), files confined to ``base`` and ``allowed``. Raises `ConfigError`."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PIPELINE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_PIPELINE_BYTES:
        raise ConfigError(f"{path}: more than {MAX_PIPELINE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8") from None
    return parse_pipeline(text, path.name, confinement=Confinement(base, tuple(allowed)))


def needs_user_code(paths: Sequence[Path], base: Path, allowed: Sequence[Path] = ()) -> bool:
    """True if a pipeline at ``paths`` names an operator that is not built in (``type:
    python`` or a plugin's entry point): validating it imports user code. Parsed without
    loading code; a pipeline that does not parse so counts as needing it (the child says why)."""
    from edgewise.pipeline.registry import Unloaded

    for path in paths:
        try:
            text = path.read_text("utf-8")
            spec = parse_pipeline(text, path.name, load_code=False,
                                  confinement=Confinement(base, tuple(allowed)))
        except (ConfigError, OSError, UnicodeDecodeError):
            return True
        for c in spec.stages:
            if c.cls is Unloaded or c.entry.type == "python":
                return True
    return False


def check_pipelines(paths: Sequence[Path], base: Path, allowed: Sequence[Path] = ()) -> str | None:
    """The problems of the pipelines at ``paths`` (one text), or None if all validate."""
    problems = []
    for path in paths:
        try:
            parse_one(path, base, allowed)
        except ConfigError as exc:
            problems.append(str(exc))
        except Exception as exc:  # a plugin's own exception while it is loaded or checked
            problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
    return "\n".join(problems) or None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgewise.edge.updater.check")
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--allow", type=Path, action="append", default=[])
    p.add_argument("pipelines", type=Path, nargs="+")
    args = p.parse_args(argv)
    problem = check_pipelines(args.pipelines, args.base, args.allow)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
