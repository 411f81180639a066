"""The rendezvous store of a daemon: one torch TCPStore process that outlives every epoch's workers.

Run as ``python -m hexgen.daemon.store --host HOST --port PORT``; prints ``ready`` once it listens and serves
until its standard input closes (the daemon holds the pipe, so the store never outlives it, even a SIGKILL).
Workers of every world whose rank 0 sits on this daemon meet here, each world under its own
key prefix (term and epoch), so replacing the workers never takes the store away from a world forming.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hexgen-store", description="hexgen rendezvous store (started by the daemon)")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    args = parser.parse_args(argv)
    import torch.distributed as dist

    try:
        store = dist.TCPStore(  # type: ignore[attr-defined]  # torch exports it without declaring it
            args.host, args.port, None, is_master=True, wait_for_workers=False, timeout=timedelta(hours=1)
        )
    except (RuntimeError, OSError, ValueError) as exc:  # torch's DistNetworkError is a RuntimeError
        print(f"hexgen-store: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print("ready", flush=True)
    sys.stdin.buffer.read()  # the daemon holds the other end: serve until it closes it or dies
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
