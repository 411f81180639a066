"""The garbage collector's policy for long-running processes: what is alive once a process has started is
kept out of the collector's reach."""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Collect once, then freeze everything alive (modules, libp2p, the node; torch and the model in a
    worker): about 150,000 objects in a daemon. A full collection walks every tracked object, and one that
    walks these stalls a daemon 150-200 ms on 2 cores; left alone it tends to fall in the first burst of
    requests after start. Later full collections walk only what was made since. O(objects alive)."""
    gc.collect()
    gc.freeze()
