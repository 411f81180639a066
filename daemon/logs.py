"""Structured logs for the daemon: one ``key=value`` line per record on stderr, easy to grep and to parse."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

LEVELS = ("debug", "info", "warning", "error")
# Third-party loggers that speak at INFO about every stream and dial.
NOISY = ("libp2p", "multiaddr", "async_service", "hypercorn", "httpx")
# Attributes every LogRecord has; anything else was passed in ``extra`` and is logged as a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def quote(value: Any) -> str:
    """A value as it appears after ``key=``: bare when it has no space, quote or equals sign, else quoted."""
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=hexgen.daemon msg="..." event=join peer=...`` (UTC, millisecond times)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields: dict[str, Any] = {
            "ts": stamp,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields |= {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return " ".join(f"{key}={quote(value)}" for key, value in fields.items())


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every record at ``level`` or above to ``stream`` (stderr) as key=value lines; quiet the
    chatty libraries unless ``level`` is debug."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (known: {', '.join(LEVELS)})")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.ERROR)
