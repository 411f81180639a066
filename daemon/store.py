"""The rendezvous store of a daemon: one torch TCPStore process that outlives every epoch's workers.

Run as ``python -m hexgen.daemon.store --host HOST --port PORT [--listen-fd FD]`` (FD: a socket the daemon
bound to HOST:PORT and listens on, so the port is never free for another server to take between the daemon
choosing it and the store serving on it); prints ``ready`` once it listens and serves
until its standard input closes (the daemon holds the pipe) or the process that started it is gone, so the store
never outlives its daemon, even a SIGKILLed one whose pipe end a stray process still holds.
Workers of every world whose rank 0 sits on this daemon meet here, each world under its own
key prefix (term and epoch), so replacing the workers never takes the store away from a world forming.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import threading
from datetime import timedelta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hexgen-store", description="hexgen rendezvous store (started by the daemon)")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--listen-fd", type=int, help="serve on this listening socket, bound to HOST:PORT")
    args = parser.parse_args(argv)
    parent = os.getppid()
    # watched from before torch's import, which can itself take long (or, in a test, block)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()
    import torch.distributed as dist

    try:
        store = dist.TCPStore(  # type: ignore[attr-defined]  # torch exports it without declaring it
            args.host,
            args.port,
            None,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(hours=1),
            master_listen_fd=args.listen_fd,
        )
    except (RuntimeError, OSError, ValueError) as exc:  # torch's DistNetworkError is a RuntimeError
        print(f"hexgen-store: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print("ready", flush=True)
    threading.Event().wait()  # served until _exit_with_parent ends the process
    del store
    return 0


def _exit_with_parent(parent: int) -> None:
    serve_while_parent_lives(parent)
    os._exit(0)


def serve_while_parent_lives(parent: int, interval_s: float = 0.5) -> None:
    """Return when standard input reaches its end or the parent ``parent`` is gone (this process re-parented)."""
    while os.getppid() == parent:
        readable, _, _ = select.select([sys.stdin.buffer], [], [], interval_s)
        if readable and not os.read(sys.stdin.buffer.fileno(), 4096):
            return


if __name__ == "__main__":
    sys.exit(main())
