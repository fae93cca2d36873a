"""`edgewise cloud ...`: placeholder until the control plane lands."""

from __future__ import annotations

import click


@click.group()
def cloud() -> None:
    """Run and administer the control plane (not built yet)."""
