"""Where an adopted plan puts engine ranks: a torch.distributed world per replica, an exchange group per epoch.

Pure functions over the plan body the coordinator signed (no I/O). Each group of the plan is a replica
with a world of its own (its store: the daemon of its first GPU), so a replica that is the same in the
next epoch (same role, layout and GPUs) keeps running. A *bridged* replica spans a host pair no world can
span: each of its stages is a world of its own (its store: the daemon of the stage's first GPU), and the
daemons carry what passes between stages under the replica's prefix, its ranks numbered as in its layout.
KV moves between replicas over the epoch's exchange group, in which ranks are numbered group by group in
the plan's order, stage-major inside a group (the engine's layout order), so every daemon derives the same
numbering from the same plan.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hexgen.coordinator.plan import SINK, SOURCE, Plan
from hexgen.daemon.messages import PlanBody

ROLES = ("prefill", "decode", "colocated")


class DeploymentError(ValueError):
    """The plan body cannot be deployed (malformed, or naming GPUs nobody advertised)."""


@dataclass(frozen=True)
class Replica:
    index: int
    group_id: int
    role: str
    layout: tuple[tuple[int, int, int], ...]  # (first layer, end layer, tp) per stage
    first_rank: int
    placement: tuple[tuple[str, int], ...]  # (peer id, local GPU) of each layout rank
    quantize: str = "none"  # its weights' quantization: the plan's (messages.PlanBody)
    bridged: bool = False  # each stage a world of its own, the daemons carrying what passes between stages

    @property
    def size(self) -> int:
        return len(self.placement)

    @property
    def key(self) -> tuple[str, tuple[tuple[int, int, int], ...], tuple[tuple[str, int], ...], str, bool]:
        """What makes a replica the same across epochs: its role, layout, GPUs, quantization and whether its
        stages are bridged (not its index or ranks)."""
        return (self.role, self.layout, self.placement, self.quantize, self.bridged)

    def stage_of(self, layout_rank: int) -> tuple[int, int]:
        """(stage, tensor rank in it) of ``layout_rank``. O(stages)."""
        first = 0
        for stage, (_, _, tp) in enumerate(self.layout):
            if layout_rank < first + tp:
                return stage, layout_rank - first
            first += tp
        raise ValueError(f"layout rank {layout_rank} is outside a replica of {self.size} ranks")

    def stage_placement(self, stage: int) -> tuple[tuple[str, int], ...]:
        """(peer id, local GPU) of each tensor rank of ``stage``."""
        first = sum(tp for _, _, tp in self.layout[:stage])
        return self.placement[first : first + self.layout[stage][2]]

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr(self.key).encode()).hexdigest()[:16]

    @property
    def driver_layout_rank(self) -> int:
        """Tensor rank 0 of the last stage: the rank that samples and speaks for the replica."""
        return sum(tp for _, _, tp in self.layout[:-1])

    @property
    def driver_peer(self) -> str:
        return self.placement[self.driver_layout_rank][0]

    def peers(self) -> set[str]:
        return {peer for peer, _ in self.placement}

    @property
    def head(self) -> str:
        """The peer of layout rank 0, whose daemon's store hosts the replica's world."""
        return self.placement[0][0]


def replica_prefix(term: int, formed: int, replica: Replica) -> str:
    """The store keys of a replica's world: its term, the epoch it formed in, and what it is."""
    return f"hexgen/{term}/{formed}/{replica.digest}/"


def bridge_prefix(term: int, formed: int, replica: Replica) -> str:
    """What a bridged replica's stages say to each other travels under this: the replica as it formed in
    epoch ``formed`` of ``term``, so a rebuilt one never reads what the old one sent. Kept across terms."""
    return f"hexgen/bridge/{term}/{formed}/{replica.digest}/"


def stage_prefix(term: int, formed: int, replica: Replica, stage: int) -> str:
    """The store keys of the world of ``stage`` of a bridged replica."""
    return f"{replica_prefix(term, formed, replica)}stage{stage}/"


@dataclass(frozen=True)
class Deployment:
    term: int
    epoch: int
    replicas: tuple[Replica, ...]
    entry_weights: tuple[tuple[int, float], ...]  # (replica, flow from the source) for prefill/colocated
    hand_off_weights: Mapping[int, tuple[tuple[int, float], ...]]  # prefill replica -> (decode replica, flow)
    rendezvous: tuple[str, int]  # the store of the epoch's gloo exchange group (its first rank's daemon)
    replica_rendezvous: tuple[tuple[str, int], ...]  # the store of each replica's own world (its first GPU's)
    restart: bool = False  # rebuild every replica, even unchanged ones (after a worker failed)
    exchange: str = "torch"  # how KV hand-offs travel: a gloo exchange group, or "libp2p" through the daemons
    # with "libp2p": the replicas whose hand-offs among themselves still go over a gloo exchange group
    gloo: tuple[int, ...] = ()
    # the store of each world a bridged replica's stage forms: that stage's first GPU's peer -> its address
    stage_rendezvous: Mapping[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def version(self) -> tuple[int, int]:
        """(term, epoch): epochs restart their count under each coordinator, so only both name a plan."""
        return self.term, self.epoch

    @property
    def needs_exchange(self) -> bool:
        """True when KV moves between replicas (some replica prefills for others)."""
        return any(r.role == "prefill" for r in self.replicas)

    @property
    def world_size(self) -> int:
        return sum(r.size for r in self.replicas)

    @property
    def exchange_prefix(self) -> str:
        return f"hexgen/{self.term}/{self.epoch}/exchange/"

    @property
    def gloo_replicas(self) -> tuple[Replica, ...]:
        """The replicas in the epoch's gloo exchange group: all of them unless KV is relayed."""
        return self.replicas if self.exchange == "torch" else tuple(self.replicas[i] for i in self.gloo)

    def in_gloo(self, replica: Replica) -> bool:
        return self.exchange == "torch" or replica.index in self.gloo

    @property
    def exchange_head(self) -> str:
        members = self.gloo_replicas or self.replicas
        return members[0].head

    def world(self, prefix: str) -> tuple[str, frozenset[str]] | None:
        """``(head, peers)`` of the world keyed under ``prefix`` in this deployment: the gloo exchange group, or
        a replica formed at this epoch or an earlier one of the term; None when no world of it has that prefix.
        O(replicas)."""
        if prefix == self.exchange_prefix:
            if not self.gloo_replicas:
                return None
            return self.exchange_head, frozenset(peer for r in self.gloo_replicas for peer in r.peers())
        found = self._replica_under(prefix)
        if found is None:
            return None
        replica, stage = found
        if stage is None:
            return None if replica.bridged else (replica.head, frozenset(replica.peers()))
        placement = replica.stage_placement(stage)
        return placement[0][0], frozenset(peer for peer, _ in placement)

    def _replica_under(self, prefix: str) -> tuple[Replica, int | None] | None:
        """The replica whose prefix (``replica_prefix``) or whose stage's (``stage_prefix``, with that stage)
        ``prefix`` is, formed at this epoch or an earlier one of the term; None for any other. O(replicas)."""
        parts = prefix.split("/")
        formed = parts[2] if len(parts) in (5, 6) else ""
        if parts[:2] != ["hexgen", str(self.term)] or parts[-1] != "" or not (formed.isascii() and formed.isdigit()):
            return None
        if int(formed) > self.epoch:
            return None
        for replica in self.replicas:
            if replica.digest != parts[3]:
                continue
            if len(parts) == 5:
                return replica, None
            index = parts[4].removeprefix("stage")
            if replica.bridged and index.isascii() and index.isdigit() and int(index) < len(replica.layout):
                return replica, int(index)
        return None

    def part_peer(self, prefix: str, rank: int) -> str | None:
        """The peer hosting rank ``rank`` of what the daemons carry under ``prefix``: the epoch's relayed
        exchange (exchange ranks), or a bridged replica of this deployment (``bridge_prefix``, its layout
        ranks, whatever term and epoch it formed in); None for any other. O(replicas)."""
        if prefix == self.exchange_prefix:
            return self.rank_peer(rank)
        replica = self._bridged_under(prefix)
        return replica.placement[rank][0] if replica is not None and 0 <= rank < replica.size else None

    def carries(self, prefix: str) -> bool:
        """Whether the daemons carry messages under ``prefix`` (``part_peer``). O(replicas)."""
        return prefix == self.exchange_prefix or self._bridged_under(prefix) is not None

    def _bridged_under(self, prefix: str) -> Replica | None:
        parts = prefix.split("/")
        if len(parts) != 6 or parts[:2] != ["hexgen", "bridge"] or parts[5] != "":
            return None
        return next((r for r in self.replicas if r.bridged and r.digest == parts[4]), None)

    def rank_peer(self, rank: int) -> str | None:
        """The peer hosting exchange rank ``rank``, or None when no replica has it. O(replicas)."""
        for replica in self.replicas:
            if replica.first_rank <= rank < replica.first_rank + replica.size:
                return replica.placement[rank - replica.first_rank][0]
        return None

    def local_ranks(self, peer_id: str) -> list[tuple[int, Replica]]:
        """``(global rank, replica)`` of every rank this peer hosts, in rank order."""
        return [
            (r.first_rank + i, r) for r in self.replicas for i, (peer, _) in enumerate(r.placement) if peer == peer_id
        ]

    def pick_entry(self, rng: random.Random, usable: Sequence[int] | None = None) -> int | None:
        """A prefill or colocated replica, with probability proportional to its flow from the source."""
        return _weighted(rng, self.entry_weights, usable)

    def pick_decode(self, prefill: int, rng: random.Random, usable: Sequence[int] | None = None) -> int | None:
        """A decode replica for a request prefilled on ``prefill``, in proportion to the flows between them."""
        return _weighted(rng, self.hand_off_weights.get(prefill, ()), usable)


@dataclass(frozen=True)
class RankWorld:
    """The world one rank of a replica forms: its ``rank`` of ``size``, met at the ``store`` of daemon ``head``
    under ``prefix``."""

    rank: int
    size: int
    head: str
    prefix: str
    store: tuple[str, int]


def rank_world(deployment: Deployment, replica: Replica, layout_rank: int, formed: int) -> RankWorld:
    """The world of ``layout_rank`` of ``replica``, placed here first at epoch ``formed``: the replica's, or,
    for a bridged replica, that of the rank's stage alone. O(stages)."""
    if not replica.bridged:
        prefix = replica_prefix(deployment.term, formed, replica)
        store = deployment.replica_rendezvous[replica.index]
        return RankWorld(layout_rank, replica.size, replica.head, prefix, store)
    stage, tp_rank = replica.stage_of(layout_rank)
    head = replica.stage_placement(stage)[0][0]
    prefix = stage_prefix(deployment.term, formed, replica, stage)
    return RankWorld(tp_rank, replica.layout[stage][2], head, prefix, deployment.stage_rendezvous[head])


def _weighted(rng: random.Random, weights: Sequence[tuple[int, float]], usable: Sequence[int] | None) -> int | None:
    choices = [(i, w) for i, w in weights if w > 0 and (usable is None or i in usable)]
    if not choices:
        return None
    point = rng.random() * sum(w for _, w in choices)
    for index, weight in choices:
        point -= weight
        if point < 0:
            return index
    return choices[-1][0]


def deployment_from_plan(body: PlanBody, rendezvous: Mapping[str, tuple[str, int]]) -> Deployment:
    """The world of an adopted plan.

    ``rendezvous`` maps a peer id to the (host, port) its daemon advertised for worlds it hosts rank 0 of.
    Raises DeploymentError when there is no plan, or it names an unknown GPU, group or peer.
    O(GPUs + flows).
    """
    plan = body.plan
    if plan is None:
        error = body.error
        reason = error if error and error.strip() else "the adopted plan has no groups to deploy"
        raise DeploymentError(" ".join(reason.split()))  # the coordinator's words, on one line
    bridged = () if body.exchange == "torch" else body.bridged_groups
    replicas = _replicas(plan, body.gpus, body.quantize, bridged)
    if not replicas:
        raise DeploymentError("the plan has no groups")
    entry, hand_off = _weights(plan, replicas)
    heads = [r.placement[0][0] for r in replicas]
    gloo = () if body.exchange == "torch" else tuple(r.index for r in replicas if r.group_id in body.gloo_groups)
    stage_heads = {r.stage_placement(s)[0][0] for r in replicas if r.bridged for s in range(len(r.layout))}
    missing = [peer for peer in [*heads, *sorted(stage_heads)] if peer not in rendezvous]
    if missing:
        raise DeploymentError(f"peer {missing[0]!r} hosts a first rank but advertised no rendezvous address")
    return Deployment(
        term=body.term,
        epoch=body.epoch,
        replicas=tuple(replicas),
        entry_weights=tuple(entry),
        hand_off_weights=hand_off,
        rendezvous=rendezvous[heads[gloo[0] if gloo else 0]],
        replica_rendezvous=tuple(rendezvous[peer] for peer in heads),
        restart=body.restart,
        exchange=body.exchange,
        gloo=gloo,
        stage_rendezvous={peer: rendezvous[peer] for peer in stage_heads},
    )


def _replicas(plan: Plan, gpus: Mapping[int, tuple[str, int]], quantize: str, bridged: Sequence[int]) -> list[Replica]:
    """One replica per group, ranks numbered in group and stage order, each quantized with ``quantize``, those
    of groups ``bridged`` bridged."""
    replicas: list[Replica] = []
    first_rank = 0
    for group in plan.groups:
        layout = tuple((stage.layers[0], stage.layers[1], stage.tp) for stage in group.stages)
        unplaced = [gpu for gpu in group.gpus if gpu not in gpus]
        if unplaced:
            raise DeploymentError(f"malformed plan: group {group.id} names GPU {unplaced[0]}, which it places nowhere")
        placement = tuple(gpus[gpu] for gpu in group.gpus)
        if not placement:
            raise DeploymentError(f"group {group.id!r} has no GPUs")
        replica = Replica(
            len(replicas), group.id, group.role, layout, first_rank, placement, quantize, group.id in bridged
        )
        replicas.append(replica)
        first_rank += len(placement)
    return replicas


def _weights(
    plan: Plan, replicas: list[Replica]
) -> tuple[list[tuple[int, float]], dict[int, tuple[tuple[int, float], ...]]]:
    """(entry replica, flow from the source) for prefill and colocated replicas, and each prefill replica's
    (decode replica, flow) choices; a prefill replica with no flow onward sends to every decode replica."""
    index_of_group = {r.group_id: r.index for r in replicas}
    entry: list[tuple[int, float]] = []
    hand_off: dict[int, list[tuple[int, float]]] = {}
    for flow in plan.flows:
        if flow.dst == SINK:
            continue
        if flow.dst not in index_of_group or (flow.src != SOURCE and flow.src not in index_of_group):
            raise DeploymentError(f"malformed plan: a flow joins {flow.src} to {flow.dst}, not both groups")
        if flow.src == SOURCE:
            entry.append((index_of_group[int(flow.dst)], flow.rate))
        else:
            hand_off.setdefault(index_of_group[int(flow.src)], []).append((index_of_group[int(flow.dst)], flow.rate))
    for replica in replicas:
        if replica.role == "prefill" and not hand_off.get(replica.index):
            hand_off[replica.index] = [(r.index, 1.0) for r in replicas if r.role == "decode"]
        if replica.role != "decode" and replica.index not in {i for i, _ in entry}:
            entry.append((replica.index, 0.0))
    return entry, {k: tuple(v) for k, v in hand_off.items()}
