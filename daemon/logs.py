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


def fold(text: str) -> str:
    """A multi-line message (py-libp2p writes several lines per failed stream) as one line."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _message(record: logging.LogRecord) -> str:
    """The record's text; a library's format string that does not match its arguments still logs."""
    try:
        return record.getMessage()
    except (TypeError, ValueError):
        return f"{record.msg} {record.args}"


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=hexgen.daemon msg="..." event=join peer=...`` (UTC, millisecond times).
    Every record is one line. A library's traceback is cut to its last line unless ``full_tracebacks``
    (debug level): the library's failures are expected ones (a client that left) far more often than not."""

    def __init__(self, full_tracebacks: bool = True) -> None:
        super().__init__()
        self.full_tracebacks = full_tracebacks

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields: dict[str, Any] = {
            "ts": stamp,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": fold(_message(record)),
        }
        fields |= {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        if record.exc_info and record.exc_info[1] is not None:
            if self.full_tracebacks or record.name.startswith("hexgen"):
                fields["exc"] = self.formatException(record.exc_info)
            else:
                fields["exc"] = fold(f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")
        return " ".join(f"{key}={quote(value)}" for key, value in fields.items())


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every record at ``level`` or above to ``stream`` (stderr) as key=value lines; quiet the
    chatty libraries unless ``level`` is debug."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (known: {', '.join(LEVELS)})")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter(full_tracebacks=level == "debug"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _own_libp2p_logs()
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.ERROR)


def quiet_libraries(names: tuple[str, ...] = ("libp2p", "multiaddr", "async_service")) -> None:
    """Only critical records from the networking libraries (a client's or the demo's own host: its teardown
    chatter is not the user's business). libp2p is imported first: its import sets its logger's level and cuts
    it off from the root, which would undo a level set before."""
    _own_libp2p_logs()
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _own_libp2p_logs() -> None:
    """py-libp2p logs through the root's handler like everything else (see ``host.adopt_libp2p_loggers``);
    imported here, when logging is configured, so that importing this module stays light."""
    from hexgen.daemon.host import adopt_libp2p_loggers

    adopt_libp2p_loggers()
