"""Process entry of ``hexgen-node join``: identity, hardware, the node, signals and the ready line."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from hexgen.coordinator.plan import layer_range
from hexgen.daemon.certificates import Certificate, load_certificate
from hexgen.daemon.config import NodeConfig
from hexgen.daemon.hardware import detect_isolated, simulated_profile
from hexgen.daemon.hardware_profile import HardwareProfile
from hexgen.daemon.heap import settle_heap
from hexgen.daemon.logs import configure_logging
from hexgen.daemon.node import Node
from hexgen.daemon.node_key import load_or_create_key
from hexgen.daemon.swarm_state import AdoptedPlan

log = logging.getLogger("hexgen.daemon")


@dataclass(frozen=True)
class JoinOptions:
    key_file: Path
    node: NodeConfig
    simulate_gpu: str | None = None
    swarm_cert: Path | None = None
    calibrate: bool = True
    log_level: str = "info"


def describe_roles(plan: AdoptedPlan, roles: list[dict[str, Any]]) -> str:
    """One line for a plan change: the epoch and what this node's GPUs do in it."""
    head = f"plan epoch {plan.epoch} (term {plan.term}, {len(plan.members)} members):"
    if not roles:
        return f"{head} no GPU of this node serves in it"
    return f"{head} " + "; ".join(
        f"GPU {r['gpu']} {r['role']} group {r['group']} stage {r['stage']} (TP {r['tp']}, layers {layer_range(*r['layers'])})"
        for r in roles
    )


def banner(node: Node) -> list[str]:
    """What an operator needs on start: who this node is, where others bootstrap from, what it serves."""
    lines = [f"hexgen node {node.peer_id} ({node.host_name})", f"model: {node.config.model}"]
    lines += [f"bootstrap others from: {addr}" for addr in node.host.addrs] if node.host else []
    if node.http_url:
        lines.append(f"http: {node.http_url} (OpenAI API under /v1, /status, /metrics)")
    return lines


def hardware_for(options: JoinOptions) -> HardwareProfile:
    if options.simulate_gpu:
        return simulated_profile(options.simulate_gpu)
    return detect_isolated(calibrate=options.calibrate)  # in a child: the daemon holds no CUDA context


async def serve(options: JoinOptions, hardware: HardwareProfile, certificate: Certificate | None) -> None:
    key_pair = load_or_create_key(options.key_file)
    # A terminal gets readable lines; a pipe (scripts, tests) only the JSON ready line, the rest is logged.
    say = print if sys.stdout.isatty() else log.info
    node = Node(
        options.node, key_pair, hardware, certificate, on_plan=lambda plan, roles: say(describe_roles(plan, roles))
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            settle_heap()
            ready = {"event": "ready", "peer_id": node.peer_id, "addrs": node.state.own_addrs, "http": node.http_url}
            print(json.dumps(ready), flush=True)
            for line in banner(node):
                say(line)
            async for signum in signals:
                log.info("received %s: leaving the swarm", signal.Signals(signum).name)
                with trio.move_on_after(2.0):
                    await node.leave()
                nursery.cancel_scope.cancel()
                break


def join(options: JoinOptions) -> int:
    """Run a daemon until SIGINT or SIGTERM; returns the exit status."""
    configure_logging(options.log_level)
    certificate = load_certificate(options.swarm_cert) if options.swarm_cert else None
    hardware = hardware_for(options)
    if options.simulate_gpu is None and hardware.gpus:
        options = dataclasses.replace(options, node=dataclasses.replace(options.node, worker_device="cuda"))
    trio.run(serve, options, hardware, certificate)
    return 0
