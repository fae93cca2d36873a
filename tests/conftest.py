"""Shared fixtures: real local services (skip, or fail under CI), pipelines from YAML text."""

from __future__ import annotations

import os
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from edgewise.pipeline.spec import PipelineSpec, parse_pipeline

if TYPE_CHECKING:
    from edgewise.testbed.system import ControlPlane

REQUIRE = os.environ.get("EDGEWISE_REQUIRE_SERVICES") == "1"

SERVICES = {
    "mosquitto": ("127.0.0.1", 1883),
    "postgres": ("127.0.0.1", 5432),
    "nats": ("127.0.0.1", 4222),
}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def need_service(name: str) -> tuple[str, int]:
    """Return (host, port) of a local service; skip (or fail under CI) when it is down."""
    host, port = SERVICES[name]
    if not _reachable(host, port):
        msg = f"{name} is not reachable on {host}:{port}"
        if REQUIRE:
            pytest.fail(f"{msg} and EDGEWISE_REQUIRE_SERVICES=1")
        pytest.skip(msg)
    return host, port


@pytest.fixture
def mosquitto() -> tuple[str, int]:
    return need_service("mosquitto")


@pytest.fixture
def nats_server() -> tuple[str, int]:
    return need_service("nats")


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One ``edgewise cloud serve`` for a module whose tests each enrol agents of their own and
    read only their own nodes' data: ``System(tmp_path, cloud=control_plane)``."""
    import asyncio

    from edgewise.testbed.system import ControlPlane, free_port

    work = tmp_path_factory.mktemp("control-plane")
    cloud = ControlPlane(work / "cloud", free_port(), work / "logs")
    try:
        asyncio.run(cloud.start())
        yield cloud
    finally:
        cloud.close()
        asyncio.run(cloud.stop())


@pytest.fixture(scope="session")
def plan_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One planner calibration cache (EDGEWISE_CACHE_DIR) for the session: calibration is per
    machine, so the engine and MQTT are calibrated once for every plan that uses it (a fresh
    cache and its reuse are test_plan_examples.test_calibration_is_cached_per_machine's)."""
    return tmp_path_factory.mktemp("plan-cache")


# the long suite: heavier variants of tests whose main case runs by default
LONG_ONLY = pytest.mark.skipif(
    os.environ.get("EDGEWISE_LONG_TESTS") != "1",
    reason="runs with EDGEWISE_LONG_TESTS=1 (the long suite); the default suite stays short")

def make_spec(body: str, tmp_path: Path | None = None, name: str = "test") -> PipelineSpec:
    """A pipeline from the YAML of its ``spec:`` section (indented or not)."""
    text = (
        "apiVersion: edgewise.io/v1\nkind: Pipeline\nmetadata:\n  name: "
        + name
        + "\nspec:\n"
        + textwrap.indent(textwrap.dedent(body).strip("\n"), "  ")
        + "\n"
    )
    return parse_pipeline(text, "<test>", base_dir=tmp_path)


@pytest.fixture
def postgres() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the local server for one test, dropped after.

    Yields its async SQLAlchemy URL (``postgresql+asyncpg://…``). Skips (or fails under CI)
    when PostgreSQL is not reachable.
    """
    import asyncio
    import concurrent.futures
    import uuid

    import asyncpg

    host, port = need_service("postgres")
    user = os.environ.get("EDGEWISE_PG_USER", "postgres")
    name = f"edgewise_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(host=host, port=port, user=user, database="test")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def run(sql: str) -> None:  # in a thread of its own: works inside a running event loop too
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, admin(sql)).result()

    run(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+asyncpg://{user}@{host}:{port}/{name}"
    finally:
        run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
