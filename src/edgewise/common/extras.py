"""The optional parts of the install: a package that needs an extra checks for it on import.

``pip install edgewise`` is the edge node (runtime and agent); the control plane needs
``edgewise[cloud]`` and the planner ``edgewise[plan]`` (pyproject.toml). Their package
``__init__`` calls `require_extra` so that importing them without the extra fails at once with a
message naming it, instead of a ModuleNotFoundError for some library deep inside.
"""

from __future__ import annotations

import importlib.util

from edgewise.errors import MissingExtra

#: extra -> the top-level modules it installs (the distributions of pyproject.toml's extras)
EXTRAS: dict[str, tuple[str, ...]] = {
    "cloud": ("sqlalchemy", "aiosqlite", "asyncpg", "alembic", "paho", "nats", "datasketches",
              "jinja2", "plotly"),
    "plan": ("matplotlib",),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that cannot be found (none: the extra is installed)."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require_extra(extra: str, part: str) -> None:
    """Raise `MissingExtra` naming ``edgewise[extra]`` unless its modules are installed.

    Finds the modules without importing them, so a package guarded by it costs nothing to
    import when the extra is there.
    """
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(
            f"{part} needs edgewise[{extra}], which is not installed (missing: "
            f"{', '.join(missing)}); install it with: pip install 'edgewise[{extra}]'"
        )
