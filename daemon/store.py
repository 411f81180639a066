"""The rendezvous store of a daemon: one torch TCPStore process that outlives every epoch's workers.

Run as ``python -m hexgen.daemon.store --host HOST --port PORT``; prints ``ready`` once it listens and serves
until killed. Workers of every world whose rank 0 sits on this daemon meet here, each world under its own
key prefix (term and epoch), so replacing the workers never takes the store away from a world forming.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hexgen-store", description="hexgen rendezvous store (started by the daemon)")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    args = parser.parse_args(argv)
    import torch.distributed as dist

    try:
        store = dist.TCPStore(
            args.host, args.port, None, is_master=True, wait_for_workers=False, timeout=timedelta(hours=1)
        )
    except Exception as exc:
        print(f"hexgen-store: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print("ready", flush=True)
    while store is not None:  # serve until killed
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
