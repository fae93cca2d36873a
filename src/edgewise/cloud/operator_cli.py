"""`edgewise node|config|data ...`: placeholder until the operator API lands."""

from __future__ import annotations

import click


@click.group()
def node() -> None:
    """Nodes of the fleet (not built yet)."""


@click.group()
def config() -> None:
    """Desired state: pipelines and config per node or label selector (not built yet)."""


@click.group()
def data() -> None:
    """Data stored in the control plane (not built yet)."""
