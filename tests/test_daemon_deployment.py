"""Pure parts of serving: where a plan puts ranks, pinned plans, and request validation at the entry."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from hexgen.coordinator.pinned import PinnedPlanError, parse_pinned, pinned_plan
from hexgen.daemon.client_requests import parse_request
from hexgen.daemon.completion import StopFilter, parse_stops
from hexgen.daemon.deployment import (
    DeploymentError,
    RankWorld,
    bridge_prefix,
    deployment_from_plan,
    rank_world,
    replica_prefix,
    stage_prefix,
)
from hexgen.daemon.messages import MessageError, PlanBody
from hexgen.daemon.model_files import ModelFilesError, model_fingerprint
from hexgen.daemon.request_limits import MAX_TOKENS_LIMIT, RequestError
from hexgen.engine.tokenizer import Tokenizer
from hexgen.testing.plans import GPU_INDEX, GPUS, PINNED, RENDEZVOUS


def body(plan_dict: dict | None, epoch: int = 7, **fields: object) -> PlanBody:
    """A plan body as it comes off the wire, through its one parser."""
    return PlanBody.from_wire({"plan": plan_dict, "gpus": GPUS, "term": 2, "epoch": epoch, "members": []} | fields)


def test_pinned_plan_becomes_a_world_with_ranks_in_group_and_stage_order():
    plan = pinned_plan(parse_pinned(PINNED, num_layers=5), GPU_INDEX)
    deployment = deployment_from_plan(body(plan.to_dict()), RENDEZVOUS)
    assert deployment.world_size == 5 and deployment.rendezvous == ("127.0.0.1", 5000)
    assert deployment.exchange_prefix == "hexgen/2/7/exchange/" and deployment.needs_exchange
    assert deployment.replica_rendezvous == (("127.0.0.1", 5000), ("127.0.0.1", 5002), ("127.0.0.1", 5001))
    prefill, split, whole = deployment.replicas
    assert (prefill.role, prefill.layout, prefill.first_rank) == ("prefill", ((0, 5, 2),), 0)
    assert (split.layout, split.first_rank, split.placement) == (((0, 3, 1), (3, 5, 1)), 2, (("pc", 0), ("pd", 1)))
    assert split.driver_peer == "pd" and split.driver_layout_rank == 1
    assert whole.first_rank == 4 and prefill.driver_peer == "pa"
    assert deployment.local_ranks("pd") == [(3, split), (4, whole)]
    moved = deployment_from_plan(body(plan.to_dict(), epoch=8, restart=True), RENDEZVOUS)
    assert [r.key for r in moved.replicas] == [r.key for r in deployment.replicas] and moved.restart
    assert [i for i, _ in deployment.entry_weights] == [0]
    assert {i for i, _ in deployment.hand_off_weights[0]} == {1, 2}


def test_a_bridged_group_forms_a_world_per_stage_and_its_stages_talk_under_its_bridge():
    plan = pinned_plan(parse_pinned(PINNED, num_layers=5), GPU_INDEX).to_dict()
    deployment = deployment_from_plan(body(plan, exchange="libp2p", bridged_groups=[1]), RENDEZVOUS)
    prefill, split, whole = deployment.replicas
    assert split.bridged and not prefill.bridged and not whole.bridged
    assert deployment.stage_rendezvous == {"pc": RENDEZVOUS["pc"], "pd": RENDEZVOUS["pd"]}
    assert split.stage_of(1) == (1, 0) and split.stage_placement(1) == (("pd", 1),)
    first, second = (stage_prefix(2, 5, split, s) for s in (0, 1))
    assert deployment.world(first) == ("pc", frozenset({"pc"})) and deployment.world(second) == (
        "pd",
        frozenset({"pd"}),
    )
    assert deployment.world(replica_prefix(2, 5, split)) is None  # no world spans the replica
    assert (
        deployment.world(stage_prefix(2, 5, split, 2)) is None
        and deployment.world(stage_prefix(2, 5, whole, 0)) is None
    )
    assert deployment.world(replica_prefix(2, 5, whole)) == ("pd", frozenset({"pd"}))
    assert rank_world(deployment, split, 1, 5) == RankWorld(0, 1, "pd", second, RENDEZVOUS["pd"])
    assert rank_world(deployment, prefill, 1, 5) == RankWorld(
        1, 2, "pa", replica_prefix(2, 5, prefill), RENDEZVOUS["pa"]
    )
    assert deployment.part_peer(bridge_prefix(2, 5, split), 1) == "pd" and not deployment.carries(
        bridge_prefix(2, 5, whole)
    )
    flat = deployment_from_plan(body(plan, bridged_groups=[1]), RENDEZVOUS)  # a plan without worldless pairs
    assert not any(r.bridged for r in flat.replicas) and flat.replicas[1].key != split.key
    with pytest.raises(DeploymentError, match="'pd' hosts a first rank"):
        deployment_from_plan(
            body(plan, exchange="libp2p", bridged_groups=[1]), {"pa": RENDEZVOUS["pa"], "pc": RENDEZVOUS["pc"]}
        )


def test_requests_follow_the_flows():
    plan = pinned_plan(parse_pinned(PINNED), GPU_INDEX).to_dict()
    plan["flows"] = [f | {"rate": 3.0} if f["dst"] == 1 else f for f in plan["flows"]]
    deployment = deployment_from_plan(body(plan), RENDEZVOUS)
    rng = random.Random(0)
    picks = Counter(deployment.pick_decode(0, rng) for _ in range(4000))
    assert 0.70 < picks[1] / 4000 < 0.80  # flow 3 against flow 1
    assert deployment.pick_decode(0, rng, usable=[0, 2]) == 2
    assert deployment.pick_entry(rng, usable=[1, 2]) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"plan": None, "error": "no group fits"}, "no group fits"), ({"gpus": {}}, "malformed plan")],
)
def test_undeployable_plans_are_refused_with_a_reason(fields, message):
    plan = pinned_plan(parse_pinned(PINNED), GPU_INDEX).to_dict()
    with pytest.raises(DeploymentError, match=message):
        deployment_from_plan(body(plan, **fields), RENDEZVOUS)
    with pytest.raises(DeploymentError, match="rendezvous"):
        deployment_from_plan(body(plan), {"pd": ("127.0.0.1", 1)})


def test_a_plan_with_an_unknown_role_does_not_parse():
    plan = pinned_plan(parse_pinned(PINNED), GPU_INDEX).to_dict()
    with pytest.raises(MessageError, match="role"):
        body({**plan, "groups": [{"id": 0, "role": "boss", "stages": []}]})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("groups = 3", "at least one"),
        ('[[groups]]\nrole = "boss"\nstages = []', "role must be"),
        ('[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["a"], layers = [1, 5] }]', "continuing from 0"),
        ('[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["a", "a"], layers = [0, 5] }]', "used twice"),
        ('[[groups]]\nrole = "colocated"\nstages = [{ gpus = [3], layers = [0, 5] }]', "HOST or HOST:INDEX"),
        ('[[groups]]\nrole = "colocated"\nstages = [{ gpus = ["a"], layers = [0, 4] }]', "the model has 5"),
        ('[[groups]]\nrole = "prefill"\nstages = [{ gpus = ["a"], layers = [0, 5] }]', "decode group"),
        ("[[groups]\n", "not valid TOML"),
    ],
)
def test_bad_pinned_plans_name_the_problem(text, message):
    with pytest.raises(PinnedPlanError, match=message):
        parse_pinned(text, num_layers=5)


def test_pinned_plan_needs_every_named_gpu():
    with pytest.raises(PinnedPlanError, match="no GPU d:1"):
        pinned_plan(parse_pinned(PINNED), {k: v for k, v in GPU_INDEX.items() if k != ("d", 1)})


def test_generate_requests_are_validated(stories_dir):
    tokenizer = Tokenizer.from_dir(stories_dir)
    tokens, sampling = parse_request({"prompt": "Once upon a time", "max_tokens": 8}, tokenizer, 512)
    assert tokens == [1, 403, 407, 261, 378] and sampling["max_tokens"] == 8
    bad = [
        ([1, 2], "is a map"),
        ({}, "exactly one"),
        ({"prompt": "x", "tokens": [1]}, "exactly one"),
        ({"tokens": []}, "non-empty"),
        ({"tokens": [1, 99999]}, "must lie in"),
        ({"tokens": [1, True]}, "non-empty list"),
        ({"tokens": [1], "max_tokens": 0}, "max_tokens"),
        ({"tokens": [1], "max_tokens": MAX_TOKENS_LIMIT + 1}, "limited"),
        ({"tokens": [1] * 500, "max_tokens": 20}, "exceeds the model's context"),
        ({"tokens": [1], "temperature": -1}, "temperature"),
        ({"tokens": [1], "colour": "red"}, "unknown fields: colour"),
    ]
    for request, message in bad:
        with pytest.raises(RequestError, match=message):
            parse_request(request, tokenizer, 512)


def test_fit_caps_max_tokens_by_the_context_left(stories_dir):
    tokenizer = Tokenizer.from_dir(stories_dir)
    fitted = {
        (490, None): 22,  # absent: all that is left
        (490, 256): 22,
        (100, 256): 256,
        (10, None): min(MAX_TOKENS_LIMIT, 502),
        (500, 4): 4,  # fewer than MIN_FIT_TOKENS left is fine for a request that asks for fewer
    }
    for (prompt, asked), expected in fitted.items():
        request = {"tokens": [1] * prompt, "fit": True} | ({} if asked is None else {"max_tokens": asked})
        assert parse_request(request, tokenizer, 512)[1]["max_tokens"] == expected, (prompt, asked)
    for prompt in (500, 512, 600):
        with pytest.raises(RequestError, match="for a reply") as caught:
            parse_request({"tokens": [1] * prompt, "fit": True, "max_tokens": 64}, tokenizer, 512)
        assert caught.value.code == "context_full"
    with pytest.raises(RequestError, match="'fit'"):
        parse_request({"tokens": [1], "fit": 1}, tokenizer, 512)


def test_model_fingerprint_tells_checkpoints_apart(tmp_path: Path, stories_dir):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (copy / name).write_bytes((stories_dir / name).read_bytes())
    assert model_fingerprint(copy) == model_fingerprint(stories_dir)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(stories_dir)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelFilesError, match="safetensors"):
        model_fingerprint(copy)


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["Once", " upon", " a", " time"], [" a "], ("Once upon", True)),
        (["ab", "cd", "ef"], ["de"], ("abc", True)),
        (["ab", "cd"], ["x"], ("abcd", False)),
        (["ab", "cd"], [], ("abcd", False)),
    ],
)
def test_stop_strings_cut_the_stream_even_across_pieces(pieces, stops, expected):
    filt = StopFilter(stops)
    out, stopped = "", False
    for piece in pieces:
        text, stopped = filt.push(piece)
        out += text
        if stopped:
            break
    if not stopped:
        out += filt.flush()
    assert (out, stopped) == expected


def test_bad_stop_strings_are_refused():
    for stop in ([""], ["x"] * 5, [3], "y" * 65):
        with pytest.raises(RequestError, match="stop"):
            parse_stops({"stop": stop})
    assert parse_stops({"stop": "\n"}) == ["\n"] and parse_stops({}) == []
