"""`edgewise agent ...`: placeholder until the agent lands."""

from __future__ import annotations

import click


@click.group()
def agent() -> None:
    """Run an edge node connected to a control plane (not built yet)."""
