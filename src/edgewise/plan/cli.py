"""`edgewise plan`: placeholder until the planner lands (see issue: Planner)."""

from __future__ import annotations

import click


@click.command()
def plan() -> None:
    """Plan what runs at the edge and what in the cloud (not built yet)."""
    raise click.ClickException("the planner is not built yet")
