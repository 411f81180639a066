"""Fuzz targets for the messages between daemons: envelopes, adverts, plan bodies, pinned plans and gossip.

Each ``check_*`` takes one input (from the generators of ``hexgen.testing.fuzz`` or libFuzzer's bytes) and
asserts the property: the parser returns a usable result or raises its documented error with a clear message.
The valid examples here (``ADVERT``, ``PLAN_BODY``, ``PINNED``, ...) seed the mutations.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import msgpack
import pytest

from hexgen.coordinator.pinned import PinnedGroup, PinnedPlanError, parse_pinned, pinned_plan
from hexgen.coordinator.plan import Plan, PlanFormatError
from hexgen.daemon.cluster_view import LinkMeasurement
from hexgen.daemon.config import NodeConfig
from hexgen.daemon.deployment import Deployment, DeploymentError, deployment_from_plan
from hexgen.daemon.envelope import EnvelopeRejected, MalformedEnvelope, ReplayGuard, from_wire, seal, to_wire, verify
from hexgen.daemon.hardware import simulated_profile
from hexgen.daemon.hardware_profile import HardwareError, HardwareProfile
from hexgen.daemon.host import new_identity
from hexgen.daemon.membership import PeerTable
from hexgen.daemon.messages import Advert, MessageError, PlanBody
from hexgen.daemon.node import Node
from hexgen.daemon.node_key import peer_id_of
from hexgen.daemon.status_reply import Status
from hexgen.daemon.swarm_view import assignments, wire_assignments
from hexgen.daemon.wire import FrameError, decode_payload, encode_frame
from hexgen.testing.fuzz import NOW, REFUSED, assert_clear, clone, mutate, outcome, random_value, show
from hexgen.testing.plans import GPU_INDEX, GPUS, PINNED, RENDEZVOUS

ALICE = new_identity()
BOB = new_identity()
ALICE_ID = peer_id_of(ALICE)
BOB_ID = peer_id_of(BOB)
GPU_PROFILE = simulated_profile("A100x2").to_dict()
MEASURED_PROFILE = {
    "gpus": [
        {
            "type": "NVIDIA GeForce RTX 4090",
            "name": "NVIDIA GeForce RTX 4090",
            "memory_gb": 24.0,
            "tflops": 160.0,
            "hbm_gb_s": 1000.0,
            "simulated": False,
            "measured_tflops": 150.0,
            "measured_hbm_gb_s": 900.0,
        }
    ],
    "cpu_count": 16,
    "memory_gb": 64.0,
    "intra_host_gb_s": None,
}
LINK = {"a": ALICE_ID, "b": BOB_ID, "gb_s": 1.25, "rtt_ms": 0.4}
ADVERT = {
    "addrs": ["/ip4/127.0.0.1/tcp/4001"],
    "hardware": GPU_PROFILE,
    "host": "alice",
    "model": "llama-2-7b",
    "load": {"in_flight": 0, "tokens_per_s": 0.0, "requests": 3},
    "links": [LINK],
    "rendezvous": ["127.0.0.1", 29500],
}
ENVELOPE_KINDS = {"advert", "lease", "plan", "leave", "failure"}
REJECTION_REASONS = {
    "malformed",
    "wrong-kind",
    "signer-mismatch",
    "bad-signer",
    "not-yet-valid",
    "expired",
    "bad-signature",
    "replayed",
    "stale",
}


SEALED_ADVERT = to_wire(seal("advert", ADVERT, ALICE, 30.0, now=NOW))


def envelope_input(seed: int) -> Any:
    """Random values and bytes, or a sealed envelope's wire map: its body mutated before sealing, its fields
    (signature included) after."""
    rng = random.Random(seed)
    roll = rng.random()
    if roll < 0.2:
        return random_value(rng)
    if roll < 0.3:
        return rng.randbytes(rng.randint(0, 300))
    body = rng.choice([ADVERT, mutate(ADVERT, rng), random_value(rng)])
    kind, key = rng.choice(sorted(ENVELOPE_KINDS)), rng.choice([ALICE, BOB])
    try:
        wire = to_wire(seal(kind, body, key, 30.0, now=NOW + rng.choice([0, -100, 50])))
    except ValueError:  # seal refuses a body with no canonical form: send it anyway
        wire = SEALED_ADVERT | {"body": body}
    return wire if rng.random() < 0.5 else mutate(wire, rng)


def check_envelope(obj: Any) -> None:
    """from_wire gives an Envelope or MalformedEnvelope; verify accepts it once or says why it will not."""
    show(obj)
    if isinstance(obj, bytes):
        try:
            obj = decode_payload(obj)
        except FrameError:
            return
    envelope = outcome(lambda: from_wire(obj), MalformedEnvelope)  # its reason is "malformed" by construction
    if envelope is REFUSED:
        return
    assert isinstance(envelope.issued, float) and isinstance(envelope.expires, float)
    guard = ReplayGuard(window_s=60.0)
    try:
        verify(envelope, kind=ENVELOPE_KINDS, now=NOW, replay=guard)
    except EnvelopeRejected as error:
        assert error.reason in REJECTION_REASONS, error.reason
        assert_clear(error)
        return
    with pytest.raises(EnvelopeRejected, match=r"^replayed: "):
        verify(envelope, kind=ENVELOPE_KINDS, now=NOW, replay=guard)


def check_hardware(data: Any) -> None:
    show(data)
    profile = outcome(lambda: HardwareProfile.from_dict(data), HardwareError)
    assert profile is REFUSED or HardwareProfile.from_dict(profile.to_dict()) == profile


def check_link(data: Any) -> None:
    show(data)
    link = outcome(lambda: LinkMeasurement.from_dict(data), HardwareError)
    assert link is REFUSED or LinkMeasurement.from_dict(link.to_dict()) == link


def check_peer_table(body: Any) -> None:
    """An advert either parses (``Advert.from_wire``, its one parser) into fields the node can use and enters
    the peer table, or is refused with a MessageError."""
    show(body)
    advert = outcome(lambda: Advert.from_wire(body), MessageError)
    if advert is REFUSED:
        return
    assert Advert.from_wire(advert.to_wire()) == advert
    table = PeerTable("self")
    table.apply_advert(ALICE_ID, advert, issued=NOW, now=NOW)
    record = table.peers[ALICE_ID]
    assert all(isinstance(a, str) for a in record.addrs) and len(record.addrs) <= 16
    assert isinstance(record.host_name, str) and isinstance(advert.model, str)
    assert isinstance(advert.load, dict) and len(advert.links) <= 64
    if advert.rendezvous is not None:  # what the node's deploy loop reads
        assert isinstance(advert.rendezvous[0], str) and 0 < advert.rendezvous[1] < 65536


def check_advert(body: Any) -> None:
    """What an advert carries, each part through its parser: the hardware profile, the link measurements
    and the whole advert into the peer table (``Adverts.apply``'s steps)."""
    check_hardware(body.get("hardware") if isinstance(body, dict) else body)
    links = body.get("links") if isinstance(body, dict) else body
    for link in (links if isinstance(links, list) else [links])[:4]:
        check_link(link)
    check_peer_table(body)


# A prefill group (TP 2), a decode group of two stages and one of a single stage, on GPUs of peers pa..pd.
PLAN = pinned_plan(parse_pinned(PINNED, num_layers=5), GPU_INDEX).to_dict() | {"meta": {"planner": "pinned"}}
PLAN_BODY = {"plan": PLAN, "gpus": GPUS, "term": 2, "epoch": 7, "members": ["pa", "pb"], "restart": False}


def check_deployment(body: PlanBody) -> None:
    deployment = outcome(lambda: deployment_from_plan(body, RENDEZVOUS), DeploymentError)
    if deployment is REFUSED:
        return
    assert isinstance(deployment, Deployment) and deployment.replicas
    assert all(r.placement and r.layout for r in deployment.replicas)
    assert isinstance(deployment.term, int) and isinstance(deployment.epoch, int)


def check_plan(data: Any) -> None:
    show(data)
    plan = outcome(lambda: Plan.from_dict(data), PlanFormatError)
    if plan is REFUSED:
        return
    again = Plan.from_dict(plan.to_dict())
    assert json.dumps(again.to_dict(), default=repr) == json.dumps(plan.to_dict(), default=repr)  # NaN != NaN
    assert all(g.role in ("prefill", "decode", "colocated") for g in plan.groups)
    assert all(isinstance(gpu, int) for gpu in plan.gpus)


def check_assignments(body: PlanBody) -> None:
    out = assignments(body)  # must never raise
    assert isinstance(out, dict)
    assert all(isinstance(peer, str) and isinstance(gpus, list) for peer, gpus in out.items())


BAD_STAGE = {"gpus": [0], "layers": [math.inf, 5]}


def check_plan_body(body: Any) -> None:
    """A plan body through its one parser (``PlanBody.from_wire``), then what the node does with it: its world
    (``deployment_from_plan``) and each peer's roles (``assignments``); the planner's Plan on its own
    (``Plan.from_dict``, to re-plan from it)."""
    show(body)
    check_plan(body.get("plan") if isinstance(body, dict) else body)
    parsed = outcome(lambda: PlanBody.from_wire(body), MessageError)
    assert wire_assignments(body) == ({} if parsed is REFUSED else assignments(parsed))  # the TUI's path
    if parsed is REFUSED:
        return
    assert PlanBody.from_wire(parsed.to_wire()) == parsed
    check_deployment(parsed)
    check_assignments(parsed)


def toml_text(value: Any) -> str:
    """``value`` (a map) as TOML inline values, to reach parse_pinned's checks with a document that parses."""

    def inline(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, float):
            return "nan" if math.isnan(item) else ("inf" if item > 0 else "-inf") if math.isinf(item) else repr(item)
        if isinstance(item, int):
            return str(item)
        if isinstance(item, dict):
            return "{ " + ", ".join(f"{json.dumps(str(k))} = {inline(v)}" for k, v in item.items()) + " }"
        if isinstance(item, list):
            return "[" + ", ".join(inline(v) for v in item) + "]"
        return json.dumps(item if isinstance(item, str) else repr(item))

    if not isinstance(value, dict):
        value = {"groups": value}
    try:
        return "\n".join(f"{json.dumps(str(k))} = {inline(v)}" for k, v in value.items())
    except RecursionError:  # too deep to write out this way: a deep document all the same
        return "groups = " + "[" * 2000 + "]" * 2000


PINNED_DICT = {
    "groups": [
        {"role": "prefill", "stages": [{"gpus": ["a", "b"], "layers": [0, 5]}]},
        {"role": "decode", "stages": [{"gpus": ["c:0"], "layers": [0, 3]}, {"gpus": ["d:1"], "layers": [3, 5]}]},
        {"role": "colocated", "stages": [{"gpus": ["d"], "layers": [0, 5]}]},
    ]
}


ODD_GPU_NAMES = ("a:²", "a:" + "9" * 5000, "a:-1", ":1", "a:", "a:1:2", "a:007", " a", "a:١")
TOML_ALPHABET = "abgroupsleyin[]{}=\"'.,:0159 \n\t#-_+\\é"


def pinned_input(seed: int) -> tuple[str, int | None]:
    """(TOML text, the model's layer count or None): random text, the valid plan as a document with mutations
    (odd GPU names among them), or the valid text with characters changed."""
    rng = random.Random(seed)
    num_layers = rng.choice([None, None, 5, rng.randint(1, 8)])
    roll = rng.random()
    if roll < 0.2:
        return "".join(rng.choice(TOML_ALPHABET) for _ in range(rng.randint(0, 200))), num_layers
    if roll < 0.75:
        document = clone(PINNED_DICT)
        if rng.random() < 0.3:
            document["groups"][rng.randint(0, 2)]["stages"][0]["gpus"] = [rng.choice(ODD_GPU_NAMES)]
        return toml_text(mutate(document, rng)), num_layers
    text = PINNED
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(text))
        text = (
            text[:at]
            + "".join(rng.choice(TOML_ALPHABET) for _ in range(rng.randint(0, 3)))
            + text[at + rng.randint(0, 3) :]
        )
    return text, num_layers


def check_pinned(document: tuple[str, int | None]) -> None:
    """An operator's pinned plan (``--pinned``): groups, or PinnedPlanError naming the problem."""
    show(document)
    text, num_layers = document
    groups = outcome(lambda: parse_pinned(text, num_layers), PinnedPlanError)
    if groups is REFUSED:
        return
    assert groups and all(isinstance(g, PinnedGroup) for g in groups)
    assert all(isinstance(index, int) and index >= 0 for g in groups for s in g.stages for _, index in s.gpus)


# BOB's advert and lease, so a node that takes them has BOB as a member and as the coordinator of term 3.
BOB_JOINS = msgpack.packb(
    [
        to_wire(seal("advert", ADVERT | {"host": "bob"}, BOB, 30.0, now=NOW)),
        to_wire(seal("lease", {"holder": BOB_ID, "term": 3, "epoch": 1}, BOB, 30.0, now=NOW)),
    ],
    use_bin_type=True,
)


def gossip_input(seed: int) -> tuple[str, Any]:
    """(kind, body) of an envelope BOB signs: a valid body of the kind mutated, or a random one."""
    rng = random.Random(seed)
    kind = rng.choice(["advert", "advert", "lease", "plan", "plan", "leave", "failure"])
    valid = {
        "advert": ADVERT | {"host": "bob"},
        "lease": {"holder": BOB_ID, "term": 3, "epoch": 2},
        "plan": {"plan": PLAN, "gpus": GPUS, "term": 3, "epoch": 2, "members": [ALICE_ID, BOB_ID], "error": None},
        "leave": {},
        "failure": {"term": 3, "epoch": 2, "rank": 0, "error": "boom"}
        | (
            {"peers": [ALICE_ID, BOB_ID], "cause": {"world": "replica world", "stage": "connect", "remote": "10.0.0.2"}}
            if rng.random() < 0.5
            else {}
        ),
    }[kind]
    return kind, random_value(rng) if rng.random() < 0.25 else mutate(valid, rng)


def check_gossip(envelope: tuple[str, Any]) -> None:
    """Signed gossip of any body never breaks the node: it applies or rejects it, and its status still works."""
    show(envelope)
    kind, body = envelope
    node = Node(NodeConfig(), ALICE, HardwareProfile.from_dict(GPU_PROFILE), clock=lambda: NOW)
    node.handle_gossip(BOB_ID, BOB_JOINS)
    assert node.election.coordinator == BOB_ID, dict(node.state.rejections)
    try:
        sealed = seal(kind, body, BOB, 30.0, now=NOW)
    except ValueError:
        return  # no canonical form: from_wire refuses it (test_envelopes)
    node.handle_gossip(BOB_ID, msgpack.packb([to_wire(sealed)], use_bin_type=True))
    status = node.status()
    encode_frame(status)  # the status protocol can still send it
    assert Status.from_wire(status).to_wire() == status, "the status parses back"
    for peer, (_, advert) in node.state.adverts.items():
        if advert.rendezvous is not None:  # what the node's deploy loop reads
            assert isinstance(advert.rendezvous[0], str) and 0 < advert.rendezvous[1] < 65536, peer
    if node.plan is not None:
        check_deployment(node.plan.body)
