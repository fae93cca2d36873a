"""Log output of every command: UTC timestamps, text or one JSON object a line.

Text (the default)::

    2026-12-06T07:50:01.123Z WARNING edgewise.edge.uplink: link to https://cloud:8443 down: ...

JSON (``--log-format json`` or ``EDGEWISE_LOG_FORMAT=json``), for journald or a log shipper::

    {"ts": "2026-12-06T07:50:01.123Z", "level": "WARNING", "logger": "edgewise.edge.uplink",
     "message": "link to https://cloud:8443 down: ...", "exc": "Traceback ..." (when there is one)}

The level is WARNING, INFO with ``-v``, DEBUG with ``-vv``. Records of a pipeline's ``log``
sink (logger ``edgewise.sink``) are always written, at the level the sink names: the sink is
output the pipeline asked for, not diagnostics.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_handler: logging.Handler | None = None  # the one this module installed on the root logger


class UtcFormatter(logging.Formatter):
    """``%(asctime)s`` as ISO 8601 UTC with milliseconds."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class JsonFormatter(UtcFormatter):
    """One JSON object a line: ts, level, logger, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(verbose: int | None = None, fmt: str = "text") -> None:
    """Set up the root logger's output (``verbose`` None: keep the level already set).

    Like `logging.basicConfig`, leaves a root logger alone that someone else gave handlers
    (a test harness running the CLI in-process)."""
    global _handler
    root = logging.getLogger()
    if verbose is not None:
        logging.getLogger("gmqtt").setLevel(logging.ERROR if verbose < 2 else logging.DEBUG)
    logging.getLogger("edgewise.sink").setLevel(logging.DEBUG)  # the log sink: see above
    if any(h is not _handler for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else UtcFormatter(TEXT_FORMAT))
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    if verbose is not None:
        root.setLevel(max(logging.WARNING - 10 * verbose, logging.DEBUG))


def log_format_option(f: Any) -> Any:
    """``--log-format`` on a long-running command (``agent run``, ``cloud serve``): the same as
    ``edgewise --log-format`` given before the command."""

    def apply(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            configure_logging(None, value)
        return value

    return click.option("--log-format", type=click.Choice(FORMATS), default=None,
                        expose_value=False, callback=apply,
                        help="Log lines: text with UTC timestamps, or one JSON object a line "
                             "(default: as `edgewise --log-format`, EDGEWISE_LOG_FORMAT).")(f)
