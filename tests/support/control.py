"""Control-plane parts built for unit tests: a shared state on a fake clock, and a fake host, no processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hexgen.daemon.adoption import Adoption
from hexgen.daemon.config import NodeConfig
from hexgen.daemon.hardware import simulated_profile
from hexgen.daemon.hardware_profile import HardwareProfile
from hexgen.daemon.host import new_identity
from hexgen.daemon.node_key import peer_id_of
from hexgen.daemon.swarm_state import AdoptedPlan, SelfInfo, SwarmState


@dataclass
class FakeClock:
    """A clock tests move by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeHost:
    """What the parts ask of a host, answered from fields a test sets."""

    addrs: list[str] = field(default_factory=lambda: ["/ip4/10.0.0.1/tcp/4001"])
    connected: set[str] = field(default_factory=set)
    dialled: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def connected_peers(self) -> set[str]:
        return set(self.connected)

    async def connect_peer(self, peer: str, addrs: list[str]) -> None:
        self.dialled.append((peer, tuple(addrs)))


@dataclass
class FakeNursery:
    """Records what a part starts in the background instead of running it."""

    started: list[tuple[Any, tuple[Any, ...]]] = field(default_factory=list)

    def start_soon(self, fn: Any, *args: Any) -> None:
        self.started.append((fn, args))


def swarm_state(
    clock: FakeClock | None = None,
    config: NodeConfig | None = None,
    key_pair: Any = None,
    hardware: HardwareProfile | None = None,
    model_hash: str | None = None,
) -> SwarmState:
    """A node's state with a fresh identity (or ``key_pair``) on ``clock``."""
    key_pair = key_pair or new_identity()
    me = SelfInfo(peer_id_of(key_pair), "test-host", hardware or simulated_profile("A100"), None, model_hash)
    return SwarmState.create(me, config or NodeConfig(), clock or FakeClock())


@dataclass
class Recorder:
    """Collects what a part hands its collaborators."""

    plans: list[AdoptedPlan] = field(default_factory=list)
    synced: list[str] = field(default_factory=list)


def adoption_of(state: SwarmState, recorder: Recorder | None = None) -> Adoption:
    recorder = recorder or Recorder()
    return Adoption(state, recorder.plans.append, recorder.synced.append)
