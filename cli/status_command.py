"""``hexgen-node status``: a daemon's live view (the Textual app) or one snapshot as text or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from hexgen.cli.status import (
    DEFAULT_HTTP_PORT,
    DEFAULT_INTERVAL_S,
    DEFAULT_URL,
    StatusError,
    fetch_once,
    render_text,
)

if TYPE_CHECKING:
    from textual.app import App


def status_app(url: str, interval: float = DEFAULT_INTERVAL_S) -> App[None]:
    """The live TUI polling ``{url}/status`` every ``interval`` seconds (``run()`` it, or ``run_test()``)."""
    from hexgen.cli.status_app import StatusApp  # Textual loads only when the TUI runs

    return StatusApp(url, interval)


def status_url(url: str | None, port: int | None) -> str:
    """The daemon's base URL from ``--url`` or ``--http``; StatusError for one that cannot work."""
    if port is not None:
        if not 1 <= port <= 65535:
            raise StatusError(f"--http {port}: expected a port from 1 to 65535")
        return f"http://127.0.0.1:{port}"
    if url is None:
        return DEFAULT_URL
    cleaned = url.strip().rstrip("/")
    cleaned = cleaned.removesuffix("/status")  # a pasted endpoint URL names the same daemon
    try:
        parts = urlsplit(cleaned)
        parts.port  # noqa: B018 - parsing the port is what validates it
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise StatusError(f"--url {url!r}: expected an HTTP address such as {DEFAULT_URL}")
    return cleaned


def cmd_status(args: argparse.Namespace) -> int:
    """Show the daemon's status: the live TUI, or one snapshot as text (``--once``) or JSON (``--json``)."""
    url = status_url(args.url, args.http)
    if not (math.isfinite(args.interval) and args.interval > 0):
        raise StatusError(f"--interval {args.interval:g}: expected a positive number of seconds")
    if args.once or args.json:
        status = asyncio.run(fetch_once(url))
        print(json.dumps(status, indent=2) if args.json else render_text(status))
        return 0
    if not sys.stdout.isatty():
        raise StatusError("the live view needs a terminal; pass --once for text or --json for the status JSON")
    status_app(url, args.interval).run()
    return 0


def add_status_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``status`` on the subcommand parser."""
    status = sub.add_parser(
        "status",
        help="show a daemon's live view: peers, GPUs, roles, plan, flows, load, events",
        description="Poll a daemon's JSON status (GET /status on the HTTP port of 'hexgen-node join --http "
        "PORT') and show it live: peers with their GPUs, roles and load; the plan's groups, flows, "
        "bottleneck and predicted throughput; the swarm's recent events. Keys: tab switches views, q quits.",
    )
    where = status.add_mutually_exclusive_group()
    where.add_argument("--url", metavar="URL", help=f"the daemon's HTTP address (default {DEFAULT_URL})")
    where.add_argument(
        "--http",
        type=int,
        metavar="PORT",
        help=f"the daemon's --http port on 127.0.0.1 (default {DEFAULT_HTTP_PORT}, "
        f"as in 'hexgen-node join --http {DEFAULT_HTTP_PORT}')",
    )
    status.add_argument("--once", action="store_true", help="print one snapshot as plain text and exit")
    status.add_argument("--json", action="store_true", help="print the status JSON as served and exit (implies --once)")
    status.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL_S,
        metavar="S",
        help=f"seconds between refreshes of the live view (default {DEFAULT_INTERVAL_S:g})",
    )
    status.set_defaults(func=cmd_status)
