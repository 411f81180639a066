"""Process entry of ``hexgen-node join``: identity, hardware, the node, signals and the ready line."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import trio

from hexgen.daemon.hardware import HardwareProfile, detect, simulated_profile
from hexgen.daemon.identity import Certificate, load_certificate, load_or_create_key
from hexgen.daemon.node import Node, NodeConfig

log = logging.getLogger("hexgen.daemon")


@dataclass(frozen=True)
class JoinOptions:
    key_file: Path
    node: NodeConfig
    simulate_gpu: str | None = None
    swarm_cert: Path | None = None
    calibrate: bool = True


def hardware_for(options: JoinOptions) -> HardwareProfile:
    if options.simulate_gpu:
        return simulated_profile(options.simulate_gpu)
    return detect(calibrate=options.calibrate)


async def serve(options: JoinOptions, hardware: HardwareProfile, certificate: Certificate | None) -> None:
    key_pair = load_or_create_key(options.key_file)
    node = Node(options.node, key_pair, hardware, certificate)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            print(json.dumps({"event": "ready", "peer_id": node.peer_id, "addrs": node.host.addrs}), flush=True)
            async for signum in signals:
                log.info("received %s: leaving the swarm", signal.Signals(signum).name)
                with trio.move_on_after(2.0):
                    await node.leave()
                nursery.cancel_scope.cancel()
                break


def join(options: JoinOptions) -> int:
    """Run a daemon until SIGINT or SIGTERM; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    certificate = load_certificate(options.swarm_cert) if options.swarm_cert else None
    hardware = hardware_for(options)
    if options.simulate_gpu is None and hardware.gpus:
        options = dataclasses.replace(options, node=dataclasses.replace(options.node, worker_device="cuda"))
    trio.run(serve, options, hardware, certificate)
    return 0
