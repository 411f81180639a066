"""Bounds shared by the engine's workers and the daemon that supervises them: times, and the world secret's size.

Torch-free on purpose: the daemon imports it, and the daemon's process must never import torch.
"""

from __future__ import annotations

# How long a loaded rank waits at the load barrier for the slowest rank of its world (engine.device).
LOAD_TIMEOUT_S = 30 * 60.0
# For a world's ranks to connect once all of them arrived (engine.formation): a gloo mesh on one network.
CONNECT_TIMEOUT_S = 5.0
# NCCL communicator creation across real multi-node GPU hosts (bootstrap, topology, IB/socket setup)
# often takes far longer than gloo's mesh.
NCCL_CONNECT_TIMEOUT_S = 60.0

# A world's store secret: an AES-256 key (engine.sealed_store seals the store's values with it).
SECRET_BYTES = 32


def connect_timeout_for(backend: str) -> float:
    """The default connect bound for a world on ``backend``."""
    return NCCL_CONNECT_TIMEOUT_S if backend == "nccl" else CONNECT_TIMEOUT_S
