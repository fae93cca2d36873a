"""Modbus TCP polling source (pymodbus 3.x asyncio client).

Every ``interval`` the source reads the configured ``registers`` of device ``unit`` at
``host``:``port`` and emits one reading per register, all stamped with the poll's wall-clock time
(``ts``) and accept time (``_accepted``). A register is read as

* ``kind``: ``holding`` or ``input`` registers, or a ``coil`` / ``discrete`` input (0 or 1);
* ``type``: ``int16``, ``uint16`` (one register), ``int32``, ``uint32``, ``float32`` (two registers,
  big-endian words unless ``word_order: little``);
* value = raw * ``scale`` + ``offset``.

Registers of the same kind at adjacent addresses are fetched in one request (up to 125 registers
or 2000 bits); when such a request fails with a Modbus exception, its registers are read one by
one so that one bad address costs only its own reading. A register that cannot be read (exception
response, e.g. an illegal address) or decodes to NaN/infinity becomes a dead letter with the
reason and is counted in ``read_errors``; the other registers of the poll are still emitted.

The connection is opened lazily and re-opened after a connection error or a timeout, paced by
the shared reconnect policy (`edgewise.common.backoff.Retry`: full jitter under a ceiling that
starts at ``reconnect_min`` and doubles up to ``reconnect_max``; failures are forgotten once a
connection has stayed up for ``RESET_AFTER_S``); an unreachable device is logged once per outage
and never stops the pipeline. Polls missed while disconnected are not made up for. A stop that
pymodbus swallowed (Python 3.11's ``asyncio.wait_for``, see `sources.cancel`) is raised again
after the attempt, so a stopped source never goes on reconnecting.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import struct
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from edgewise.common.backoff import Backoff, Retry
from edgewise.pipeline.batch import ACCEPTED, Batch
from edgewise.pipeline.component import ComponentConfig, RunContext, Source, SourceOutput
from edgewise.pipeline.sources.cancel import stop_if_cancelled
from edgewise.pipeline.units import Duration

log = logging.getLogger(__name__)

WIDTH = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
FORMAT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}
MAX_REGISTERS = 125  # per read request (Modbus limit)
MAX_BITS = 2000
RESET_AFTER_S = 30.0  # connected this long: earlier connection failures are forgotten


class RegisterConfig(ComponentConfig):
    name: str = Field(min_length=1)
    """The sensor name of the readings."""
    address: int = Field(ge=0, le=65535)
    kind: Literal["holding", "input", "coil", "discrete"] = "holding"
    type: Literal["int16", "uint16", "int32", "uint32", "float32"] = "uint16"
    count: Literal[1, 2] | None = None
    """Registers per value; follows from ``type`` (given only as a check)."""
    scale: float = 1.0
    offset: float = 0.0
    word_order: Literal["big", "little"] = "big"

    @model_validator(mode="after")
    def _consistent(self) -> RegisterConfig:
        if self.kind in ("coil", "discrete"):
            if self.count not in (None, 1):
                raise ValueError(f"{self.name}: a {self.kind} is one bit; count must be 1")
            return self
        if self.count is not None and self.count != WIDTH[self.type]:
            raise ValueError(
                f"{self.name}: type {self.type} takes {WIDTH[self.type]} register(s), "
                f"not count={self.count}"
            )
        if self.address + WIDTH[self.type] - 1 > 65535:
            raise ValueError(f"{self.name}: address {self.address} + width is past 65535")
        return self

    @property
    def width(self) -> int:
        return 1 if self.kind in ("coil", "discrete") else WIDTH[self.type]


class ModbusConfig(ComponentConfig):
    host: str
    """The Modbus TCP device's host name or address."""
    port: int = Field(default=502, ge=1, le=65535)
    """The device's TCP port."""
    unit: int = Field(default=1, ge=0, le=255)
    """Modbus unit (slave) id of the device."""
    interval: Duration = 1.0
    """Time between polls of all registers."""
    timeout: Duration = 1.0
    """How long one request may take before the connection is re-opened."""
    registers: list[RegisterConfig] = Field(min_length=1)
    """The registers to read: name, address, kind, type, scale, offset, word_order."""
    reconnect_min: Duration = 0.5
    """Longest wait before the first reconnection attempt (random up to it); doubled after each
    failed one."""
    reconnect_max: Duration = 30.0
    """Longest wait between reconnection attempts."""

    @model_validator(mode="after")
    def _checks(self) -> ModbusConfig:
        if self.interval <= 0:
            raise ValueError("interval must be more than 0")
        if self.timeout <= 0:
            raise ValueError("timeout must be more than 0")
        if self.reconnect_min <= 0:
            raise ValueError("reconnect_min must be more than 0")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be at least reconnect_min")
        return self


@dataclass
class _Block:
    """One read request: registers of one kind in a contiguous address range."""

    kind: str
    start: int
    count: int
    regs: list[tuple[int, RegisterConfig]]  # (index in the config, register)


def plan_blocks(registers: list[RegisterConfig]) -> list[_Block]:
    """Group registers of the same kind at adjacent or overlapping addresses into requests."""
    blocks: list[_Block] = []
    order = sorted(enumerate(registers), key=lambda p: (p[1].kind, p[1].address))
    for i, reg in order:
        limit = MAX_BITS if reg.kind in ("coil", "discrete") else MAX_REGISTERS
        last = blocks[-1] if blocks else None
        end = reg.address + reg.width
        if (
            last is not None
            and last.kind == reg.kind
            and reg.address <= last.start + last.count
            and max(end, last.start + last.count) - last.start <= limit
        ):
            last.count = max(last.count, end - last.start)
            last.regs.append((i, reg))
        else:
            blocks.append(_Block(reg.kind, reg.address, reg.width, [(i, reg)]))
    return blocks


def decode(reg: RegisterConfig, words: list[int]) -> float:
    """The scaled value of one register from its raw 16-bit words (or one bit)."""
    if reg.kind in ("coil", "discrete"):
        raw: float = 1.0 if words[0] else 0.0
    else:
        ordered = words if reg.word_order == "big" else list(reversed(words))
        data = b"".join(int(w & 0xFFFF).to_bytes(2, "big") for w in ordered)
        raw = struct.unpack(FORMAT[reg.type], data)[0]
    return raw * reg.scale + reg.offset


class _ReadError(Exception):
    """The device answered with a Modbus exception for this request."""


class ModbusSource(Source):
    Config = ModbusConfig

    def __init__(self, id: str, config: ModbusConfig, ctx: RunContext) -> None:
        super().__init__(id, config, ctx)
        self.blocks = plan_blocks(config.registers)
        self.names = np.array([r.name for r in config.registers], dtype=object)
        self.polls = 0
        self.readings = 0
        self.read_errors = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.connected = False
        self._unit_kw = "device_id"
        # reconnect pacing; a test may replace it (e.g. with a fixed rng) before run()
        self.retry = Retry(Backoff(config.reconnect_min, config.reconnect_max), RESET_AFTER_S)

    def stats(self) -> dict[str, Any]:
        return {
            "polls": self.polls,
            "readings": self.readings,
            "read_errors": self.read_errors,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "connected": self.connected,
        }

    def _where(self) -> str:
        return f"Modbus device {self.config.unit} at {self.config.host}:{self.config.port}"

    async def run(self, out: SourceOutput) -> None:
        from pymodbus.client import AsyncModbusTcpClient

        cfg = self.config
        params = inspect.signature(AsyncModbusTcpClient.read_holding_registers).parameters
        self._unit_kw = "device_id" if "device_id" in params else "slave"  # pymodbus < 3.10
        retry = self.retry
        ever_connected = False
        outage_logged = False  # the current outage has been logged (once per outage)
        loop = asyncio.get_running_loop()
        while True:
            client = AsyncModbusTcpClient(
                cfg.host, port=cfg.port, timeout=cfg.timeout, retries=0, reconnect_delay=0
            )
            try:
                if not await client.connect():
                    stop_if_cancelled()  # pymodbus's wait_for may have swallowed a stop
                    self.connect_failures += 1
                    if not outage_logged:
                        outage_logged = True
                        log.warning("source %s: cannot connect to %s; retrying with backoff "
                                    "(up to every %gs)", self.id, self._where(), cfg.reconnect_max)
                    await asyncio.sleep(retry.failed())
                    continue
                self.connected = True
                retry.connected()
                if ever_connected:
                    self.reconnects += 1
                    log.warning("source %s: reconnected to %s", self.id, self._where())
                else:
                    log.info("source %s: connected to %s", self.id, self._where())
                ever_connected = True
                outage_logged = False
                next_poll = loop.time()
                while True:
                    batch = await self._poll(client, out)
                    stop_if_cancelled()  # as may a request's
                    if batch.n:
                        await out.emit(batch, None)
                    next_poll += cfg.interval
                    now = loop.time()
                    if next_poll < now:  # fell behind (slow device): skip, do not burst
                        next_poll = now + cfg.interval
                    await asyncio.sleep(next_poll - now)
            except (ConnectionError, TimeoutError, OSError, _ConnectionLost) as exc:
                stop_if_cancelled()
                if self.connected:
                    outage_logged = True
                    log.warning("source %s: lost %s (%s); reconnecting", self.id, self._where(),
                                exc or type(exc).__name__)
                self.connected = False
                await asyncio.sleep(retry.failed())
            finally:
                self.connected = False
                client.close()

    async def _poll(self, client: Any, out: SourceOutput) -> Batch:
        """Read every register once; returns the readings of this poll."""
        ts = time.time()
        n = len(self.config.registers)
        values = np.full(n, np.nan)
        for block in self.blocks:
            try:
                words = await self._read(client, block.kind, block.start, block.count)
            except _ReadError as exc:
                if len(block.regs) == 1:
                    self._bad(out, block.regs[0][1], str(exc))
                    continue
                for i, reg in block.regs:  # find the bad one(s)
                    try:
                        one = await self._read(client, reg.kind, reg.address, reg.width)
                    except _ReadError as exc1:
                        self._bad(out, reg, str(exc1))
                        continue
                    self._store(out, values, i, reg, one)
                continue
            for i, reg in block.regs:
                k = reg.address - block.start
                self._store(out, values, i, reg, words[k : k + reg.width])
        self.polls += 1
        good = ~np.isnan(values)
        m = int(good.sum())
        self.readings += m
        if m == 0:
            return Batch.empty()
        return Batch(
            {
                "sensor": self.names[good],
                "ts": np.full(m, ts),
                "value": values[good],
                ACCEPTED: np.full(m, time.perf_counter()),
            },
            m,
        )

    def _store(
        self, out: SourceOutput, values: np.ndarray, i: int, reg: RegisterConfig, words: list[int]
    ) -> None:
        value = decode(reg, words)
        if not math.isfinite(value):
            self._bad(out, reg, f"decoded to {value} (raw words {words})")
            return
        values[i] = value

    def _bad(self, out: SourceOutput, reg: RegisterConfig, reason: str) -> None:
        self.read_errors += 1
        out.dead_letter(
            f"{self._where()}: register {reg.name!r} ({reg.kind} {reg.address}, {reg.type}): "
            f"{reason}",
            f"{reg.kind}:{reg.address}",
        )

    async def _read(self, client: Any, kind: str, address: int, count: int) -> list[int]:
        from pymodbus.exceptions import ConnectionException, ModbusIOException

        fn = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }[kind]
        try:
            rr = await fn(address, count=count, **{self._unit_kw: self.config.unit})
        except (ConnectionException, ModbusIOException) as exc:
            raise _ConnectionLost(str(exc)) from None
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            raise _ReadError(f"device answered with Modbus exception {code}"
                             f"{' (' + EXCEPTIONS[code] + ')' if code in EXCEPTIONS else ''}")
        if kind in ("coil", "discrete"):
            return [int(b) for b in rr.bits[:count]]
        return list(rr.registers)


class _ConnectionLost(Exception):
    """The connection failed or the device did not answer in time."""


EXCEPTIONS = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    6: "device busy",
    10: "gateway path unavailable",
    11: "gateway target did not respond",
}
