"""The optional parts of the install (src/edgewise/common/extras.py, pyproject.toml): the guard
of each extra names exactly the modules its distributions install, and a missing one fails the
import with the pip command (the real base-only install: tests/e2e/test_base_install.py)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from edgewise.common import extras
from edgewise.errors import ConfigError, MissingExtra

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.mark.parametrize("extra", sorted(extras.EXTRAS))
def test_guard_matches_the_extra_in_pyproject(extra: str) -> None:
    reqs = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"][extra]
    dists = {Requirement(r).name.lower() for r in reqs}
    modules = {m for m, ds in importlib.metadata.packages_distributions().items()
               if any(d.lower() in dists for d in ds) and not m.startswith("_")}
    assert set(extras.EXTRAS[extra]) <= modules
    # every distribution of the extra is checked through one of its modules
    checked = {d.lower() for m in extras.EXTRAS[extra]
               for d in importlib.metadata.packages_distributions()[m]}
    assert checked == dists


def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(extras.EXTRAS, "cloud", ("sqlalchemy", "no_such_module_here"))
    with pytest.raises(MissingExtra) as err:
        extras.require_extra("cloud", "the control plane (edgewise.cloud)")
    assert str(err.value) == (
        "the control plane (edgewise.cloud) needs edgewise[cloud], which is not installed "
        "(missing: no_such_module_here); install it with: pip install 'edgewise[cloud]'")
    assert isinstance(err.value, ImportError) and isinstance(err.value, ConfigError)
    assert extras.missing_modules("plan") == []  # installed here
