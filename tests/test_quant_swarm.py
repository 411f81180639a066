"""Quantization across the swarm: the planner counts the bytes the engine holds, adverts offer quantizations,
a plan records its one and leaves out members that cannot load it, and workers are told it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hexgen.coordinator.cluster import HostSpec, build_cluster
from hexgen.coordinator.cost import CostModel, LengthStats, StageHardware
from hexgen.coordinator.specs import GPU_TYPES, MODELS, SpecError, model_from_hf_config, resolve_model
from hexgen.daemon.cluster_view import PeerHardware
from hexgen.daemon.config import ConfigError, NodeConfig
from hexgen.daemon.deployment import deployment_from_plan
from hexgen.daemon.hardware import simulated_profile
from hexgen.daemon.messages import Advert, MessageError, PlanBody
from hexgen.daemon.planning import PlanningInput, compute_plan
from hexgen.daemon.worker_config import WorkerSettings
from hexgen.daemon.worker_setup import MalformedFrame, ReplicaSetup
from hexgen.engine.quant_bytes import QUANTIZATIONS, SCHEMES, name_of, scheme_of

A, B = "12D3KooWPeerA", "12D3KooWPeerB"
A100 = GPU_TYPES["A100"]


def _enginequantized_linear_bytes(model_dir: Path, scheme: str | None) -> int:
    """Bytes of every quantized linear of the engine's model of ``model_dir`` loaded whole on the CPU."""
    import torch

    from hexgen.engine.config import load_config
    from hexgen.engine.layers import Shard
    from hexgen.engine.loader import load_weights, quantized_linears
    from hexgen.engine.models import build_model
    from hexgen.engine.quant import weight_bytes

    config = load_config(model_dir)
    model = build_model(config, Shard(0, config.num_layers, config.num_layers))
    load_weights(model, str(model_dir), torch.float32, torch.device("cpu"), None, scheme)
    return sum(weight_bytes(linear) for linear in quantized_linears(model).values())


@pytest.mark.parametrize("scheme", [None, *SCHEMES])
def test_the_planner_counts_the_bytes_the_engine_holds(stories_dir: Path, scheme: str | None) -> None:
    spec = dataclasses.replace(resolve_model(str(stories_dir)), quantize=scheme)
    assert _enginequantized_linear_bytes(stories_dir, scheme) == spec.layers * spec.layer_bytes
    embedding = (spec.embedding_params + spec.head_params) * spec.bytes_per_param
    assert spec.weight_bytes == spec.layers * spec.layer_bytes + embedding


def test_a_70b_replica_fits_one_80gb_gpu_in_int4_only() -> None:
    full = MODELS["llama-2-70b"]
    int4 = dataclasses.replace(full, quantize="int4")
    hw = StageHardware(1, A100.tflops, A100.hbm_gbps, A100.memory_gb, 300.0, False)
    stats = LengthStats(prompt=512, prompt_sq=512**2, output=128)
    costs = {m.quantize: CostModel(build_cluster([HostSpec("h", "A100", 1)]), m, stats) for m in (full, int4)}
    fits = {scheme: cost.max_layers(hw, 1, True, True) for scheme, cost in costs.items()}
    assert fits[None] < full.layers <= fits["int4"]
    # a batch-1 decode step reads the layer's weights: int4 reads about a third of fp16's bytes
    steps = {scheme: cost.decode_stage(hw, 1, 1, True, True, None).per_layer for scheme, cost in costs.items()}
    assert steps["int4"] < 0.4 * steps[None]


def test_names_and_bad_schemes() -> None:
    assert [scheme_of(name) for name in QUANTIZATIONS] == [None, *SCHEMES]
    assert [name_of(scheme_of(name)) for name in QUANTIZATIONS] == list(QUANTIZATIONS)
    with pytest.raises(ValueError, match="choose one of none, int8, int4"):
        scheme_of("fp8")
    with pytest.raises(SpecError, match="unknown quantization 'int3'"):
        dataclasses.replace(MODELS["llama-2-7b"], quantize="int3")
    with pytest.raises(ConfigError, match="quantize int3: choose one of none, int8, int4"):
        NodeConfig(quantize="int3")


def test_adverts_offer_quantizations_and_old_ones_offer_full_precision() -> None:
    advert = Advert(("/ip4/127.0.0.1/tcp/1",), simulated_profile("L40x1"), "a", quantizations=QUANTIZATIONS)
    body = advert.to_wire()
    assert Advert.from_wire(body) == advert
    old = {k: v for k, v in body.items() if k != "quantizations"}
    assert Advert.from_wire(old).quantizations == ("none",)
    assert Advert.from_wire(body | {"quantizations": ["fp4", "int4"]}).quantizations == ("int4",)
    with pytest.raises(MessageError, match="quantizations"):
        Advert.from_wire(body | {"quantizations": "int4"})


def test_a_plan_records_its_quantization() -> None:
    body = PlanBody(term=1, epoch=2, members=(A,), quantize="int8")
    assert PlanBody.from_wire(body.to_wire()) == body
    old = {k: v for k, v in body.to_wire().items() if k != "quantize"}
    assert PlanBody.from_wire(old).quantize == "none"
    with pytest.raises(MessageError, match="plan quantize"):
        PlanBody.from_wire(body.to_wire() | {"quantize": "int3"})


def _given(quantize: str | None, offered_by_b: tuple[str, ...]) -> PlanningInput:
    peers = [PeerHardware(A, "a", simulated_profile("L40x1")), PeerHardware(B, "b", simulated_profile("L40x1"))]
    model = dataclasses.replace(MODELS["llama-2-7b"], quantize=quantize)
    return PlanningInput(model, peers, [], quantizations={A: QUANTIZATIONS, B: offered_by_b})


def test_a_member_that_cannot_load_the_plans_quantization_is_left_out_and_told() -> None:
    both = compute_plan(_given("int4", QUANTIZATIONS))
    assert both.plan is not None and both.error is None
    assert {peer for peer, _ in both.gpus.values()} == {A, B}
    outcome = compute_plan(_given("int4", ("none",)))
    assert outcome.plan is not None and outcome.throughput > 0
    assert {peer for peer, _ in outcome.gpus.values()} == {A}
    assert outcome.error == f"left out: b ({B}) cannot load int4 weights"
    full = compute_plan(_given(None, ("none",)))  # full precision: every member can
    assert full.error is None and {peer for peer, _ in full.gpus.values()} == {A, B}


def test_workers_load_the_plans_quantization() -> None:
    outcome = compute_plan(_given("int8", QUANTIZATIONS))
    assert outcome.plan is not None
    body = PlanBody(1, 1, (A, B), outcome.plan, gpus=outcome.gpus, quantize="int8")
    rendezvous = {A: ("127.0.0.1", 1), B: ("127.0.0.1", 2)}
    deployment = deployment_from_plan(PlanBody.from_wire(body.to_wire()), rendezvous)
    assert {r.quantize for r in deployment.replicas} == {"int8"}
    unquantized = deployment_from_plan(dataclasses.replace(body, quantize="none"), rendezvous)
    # a replica is rebuilt, not kept, when the swarm's quantization changes
    assert {r.key for r in deployment.replicas}.isdisjoint(r.key for r in unquantized.replicas)
    setup = WorkerSettings("/models/m").replica(deployment.replicas[0])
    assert setup.quantize == "int8"
    assert ReplicaSetup.from_wire(setup.to_wire()) == setup
    old = {k: v for k, v in setup.to_wire().items() if k != "quantize"}
    assert ReplicaSetup.from_wire(old).quantize == "none"
    with pytest.raises(MalformedFrame, match="quantize"):
        ReplicaSetup.from_wire(setup.to_wire() | {"quantize": "int3"})


def test_a_pre_quantized_checkpoint_is_planned_with_the_bytes_it_ships() -> None:
    """A GPTQ config's linear weights count 4 bits and a scale and offset per group of 128 (act order: and a
    group index per input); a format the engine cannot load is refused in one line."""
    config = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 2}
    config |= {"intermediate_size": 11008, "vocab_size": 32000, "torch_dtype": "float16"}
    full = model_from_hf_config(config)
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    spec = model_from_hf_config(config | {"quantization_config": gptq})
    assert spec.prequantized is not None and spec.quantize is None
    linear = 4096 * 4096 // 2 + 2 * 4096 * 32 * 2  # codes, then a scale and an offset per group of 128
    assert spec.layer_bytes < dataclasses.replace(full, quantize="int4").layer_bytes < full.layer_bytes
    assert spec.quantized_linear_bytes(4096, 4096) == linear
    ordered = model_from_hf_config(config | {"quantization_config": gptq | {"desc_act": True}})
    assert ordered.quantized_linear_bytes(4096, 4096) == linear + 4 * 4096
    with pytest.raises(SpecError, match=r"^model custom: gptq checkpoints of 3 bits are not supported"):
        model_from_hf_config(config | {"quantization_config": gptq | {"bits": 3}})
