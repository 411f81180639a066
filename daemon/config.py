"""A daemon's settings (``NodeConfig``), which check themselves when built: by the CLI, a test or local_swarm."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from hexgen.coordinator.pinned import PinnedGroup
from hexgen.daemon.host import HostConfig
from hexgen.engine.hub import HubError, hub_id_of
from hexgen.engine.quant_bytes import QUANTIZATIONS


class ConfigError(ValueError):
    """A setting out of its range: which one (``setting``, a field name), its value when it matters, and why."""

    def __init__(self, setting: str, problem: str, value: object = None) -> None:
        self.setting, self.problem, self.value = setting, problem, value
        super().__init__(self.text(setting))

    def text(self, name: str, names: Mapping[str, str] | None = None) -> str:
        """The message with the setting called ``name`` and any other it mentions by ``names`` (a command
        line says its flags)."""
        problem = re.sub(r"\{(\w+)\}", lambda m: (names or {}).get(m[1], m[1]), self.problem)
        return f"{name} {self.value}: {problem}" if self.value is not None else f"{name} {problem}"


MAX_PREFILL_CHUNK = 1 << 20
POSITIVE = {
    "peer_timeout_s",
    "lease_ttl_s",
    "tick_s",
    "probe_interval_s",
    "heartbeat_interval_s",
    "hung_after_s",
    "request_timeout_s",
    "connect_timeout_s",
    "advert_interval_s",
    "advert_refresh_s",
}


@dataclass(frozen=True)
class NodeConfig:
    model: str = "llama-2-7b"  # a checkpoint directory (a Hub id resolved to its snapshot first), or a preset
    host: HostConfig = field(default_factory=HostConfig)
    bootstrap: tuple[str, ...] = ()
    host_name: str = ""
    advert_interval_s: float = 15.0  # while the advert's content changes
    advert_refresh_s: float = 45.0  # while it does not
    # for peers with no direct connection; a connected peer is watched by the connection's health pings
    peer_timeout_s: float = 100.0
    lease_ttl_s: float = 12.0
    plan_debounce_s: float = 0.15
    tick_s: float = 0.5
    # A node that dialled bootstrap peers listens this long for a live lease before claiming one itself.
    startup_grace_s: float = 2.0
    probe_interval_s: float = 30.0
    probes_per_round: int = 2
    # The coordinator pings each member over a long-lived stream; a peer silent for hung_after_s is dropped
    # (a stopped process keeps its TCP connections open, so only silence shows it).
    heartbeat_interval_s: float = 0.6
    hung_after_s: float = 1.9
    heartbeat_warmup_s: float = 5.0
    worker_device: str = "cpu"
    worker_threads: int = 1
    verify_fraction: float = 0.0  # of this entry's finished requests, spot-checked on other replicas
    tamper_tokens: bool = False  # tests only: answer replica hops with wrong tokens
    pinned: tuple[PinnedGroup, ...] | None = None
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # the OpenAI-compatible gateway, /status and /metrics; None: no HTTP
    api_key: str | None = None  # required as a bearer token on /v1/* when set
    max_request_rate: float = 0.0  # generate requests per second one client peer may send (0: no limit)
    request_timeout_s: float = 30.0  # a request no replica takes (no token) for this long gets an error
    # for a world's ranks to connect once all of them started; None: the backend's (engine.bounds)
    connect_timeout_s: float | None = None
    # Members lost without a goodbye are dialled again, first after redial_first_s, the gap doubling up to
    # redial_max_gap_s, for redial_for_s: a partition that outlasts TCP's retransmissions closes its
    # connections, and only a dial brings the sides back together.
    redial_first_s: float = 1.0
    redial_max_gap_s: float = 20.0
    redial_for_s: float = 1800.0
    relay: bool = False  # serve circuit relay v2 (hop) for the swarm's members
    relay_only: bool = False  # a relay that offers no GPUs (``hexgen-node relay``)
    relay_peers: tuple[str, ...] = ()  # relays to reserve a slot on, for a node that cannot be dialled
    splice_port: int = 0  # a relay's TCP port for KV splices (``daemon.splice``); 0: any free one
    mdns: bool = True  # announce this node on its LAN and dial the daemons heard there
    quantize: str = "none"  # the weights of every replica of the plans this node makes as coordinator
    prefill_chunk: int | None = None  # prompt tokens a step of this node's replicas prefills (None: the role's)

    def __post_init__(self) -> None:
        _check_model(self.model)
        for item in fields(self):
            if item.name.endswith("_s"):
                _check_seconds(item.name, getattr(self, item.name))
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ConfigError("verify_fraction", "a fraction is 0 to 1", self.verify_fraction)
        if not 0.0 <= self.max_request_rate < math.inf:
            raise ConfigError("max_request_rate", "give requests per second, 0 for no limit", self.max_request_rate)
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError("http_port", "a port is 0-65535", self.http_port)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key", "must not be empty")
        if self.api_key is not None and self.http_port is None:
            raise ConfigError("api_key", "guards the HTTP API: give {http_port} too")
        if self.probes_per_round < 0:
            raise ConfigError("probes_per_round", "must be 0 or more", self.probes_per_round)
        _check_quantize(self.quantize)
        _check_workers(self)
        _check_relay(self)


def _check_workers(config: NodeConfig) -> None:
    if config.worker_threads < 1:
        raise ConfigError("worker_threads", "must be 1 or more", config.worker_threads)
    chunk = config.prefill_chunk
    if chunk is not None and not 0 <= chunk <= MAX_PREFILL_CHUNK:
        raise ConfigError("prefill_chunk", f"give 1 to {MAX_PREFILL_CHUNK} tokens, 0 for whole prompts", chunk)


def _check_relay(config: NodeConfig) -> None:
    if config.relay_only and not config.relay:
        raise ConfigError("relay_only", "needs {relay} too")
    if not 0 <= config.splice_port <= 65535:
        raise ConfigError("splice_port", "a port is 0-65535", config.splice_port)
    if config.splice_port and not config.relay:
        raise ConfigError("splice_port", "is a relay's: give {relay} too", config.splice_port)
    if config.relay and config.relay_peers:
        raise ConfigError("relay_peers", "are for a node that cannot be dialled, and a relay must be dialled")


def _check_quantize(name: str) -> None:
    if name not in QUANTIZATIONS:
        raise ConfigError("quantize", f"choose one of {', '.join(QUANTIZATIONS)}", name)


def _check_model(model: str) -> None:
    """The daemon and its workers read the model from disk, so a Hub id must already be resolved to its
    snapshot directory (``hexgen.engine.hub.local_model``, which may download it) when it becomes a setting."""
    if not model.strip():
        raise ConfigError("model", "must name a checkpoint directory or a preset")
    try:
        hub_id = hub_id_of(model)
    except HubError:
        raise ConfigError("model", "is neither a directory, a preset nor a Hub id org/name[@revision]", model) from None
    if hub_id is not None:
        raise ConfigError("model", "is a Hub id: resolve it to its snapshot directory first (engine.hub)", model)


def _check_seconds(name: str, value: float | None) -> None:
    if value is None:
        return
    if name in POSITIVE and not 0.0 < value < math.inf:
        raise ConfigError(name, "give a positive number of seconds", value)
    if not 0.0 <= value <= math.inf:  # NaN too
        raise ConfigError(name, "give a non-negative number of seconds", value)
