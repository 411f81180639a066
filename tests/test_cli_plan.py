"""``hexgen-node plan`` run as a real subprocess: a good run, its JSON, and every kind of bad input."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hexgen.coordinator.specs import MODELS
from hexgen.engine.quant_bytes import scheme_of
from hexgen.testing.cli import node, run_main

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "bench" / "clusters"
TRACE = ROOT.parent / "shared" / "data" / "AzureLLMInferenceTrace_conv.csv"
needs_trace = pytest.mark.skipif(not TRACE.is_file(), reason=f"Azure trace not present at {TRACE}")


def _small_trace(tmp_path: Path) -> Path:
    """A four-request trace CSV, enough to build any of the workloads."""
    path = tmp_path / "trace.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.0000000,300,40\n"
        "2023-11-16 18:15:47.0000000,900,60\n"
        "2023-11-16 18:15:48.0000000,200,300\n"
        "2023-11-16 18:15:49.0000000,1200,400\n"
    )
    return path


@pytest.fixture(scope="module")
def het4_text() -> subprocess.CompletedProcess[str]:
    pytest.importorskip("hexgen.coordinator.planner")
    if not TRACE.is_file():
        pytest.skip(f"Azure trace not present at {TRACE}")
    return node("plan", CLUSTERS / "het-4.toml", "--model", "llama-2-70b")


@pytest.fixture(scope="module")
def het4_json() -> dict[str, Any]:
    pytest.importorskip("hexgen.coordinator.planner")
    if not TRACE.is_file():
        pytest.skip(f"Azure trace not present at {TRACE}")
    run = node("plan", CLUSTERS / "het-4.toml", "--model", "llama-2-70b", "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_good_run_prints_hosts_throughput_and_baselines(
    het4_text: subprocess.CompletedProcess[str], het4_json: dict[str, Any]
) -> None:
    assert het4_text.returncode == 0, het4_text.stderr
    assert het4_text.stderr == ""
    out = het4_text.stdout
    for host in ("h100-0", "a100-0", "l40-0", "a6000-0"):
        assert host in out
    # The same plan in both forms (planning is deterministic), so the text shows the JSON's figures.
    assert f"predicted throughput  {het4_json['throughput_rps']:.3f} req/s" in out
    assert f"{het4_json['tokens_per_s']:,.0f} tokens/s" in out
    for name in ("distserve", "hexgen", "naive"):
        baseline = het4_json["baselines"][name]
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        if "error" in baseline:
            assert "infeasible" in line
        else:
            assert f"{baseline['throughput_rps']:.3f}" in line
            assert f"{baseline['ratio']:.2f}x" in line
    for group in het4_json["groups"]:
        assert group["role"] in out


def test_json_groups_use_only_existing_gpus(het4_json: dict[str, Any]) -> None:
    gpu_ids = [g["id"] for g in het4_json["cluster"]["gpus"]]
    assert gpu_ids == list(range(20))  # het-4: 2 + 4 + 6 + 8
    used = [gpu for group in het4_json["groups"] for stage in group["stages"] for gpu in stage["gpus"]]
    assert used and set(used) <= set(gpu_ids)
    assert len(used) == len(set(used)), "a GPU is in two groups"
    group_ids = {group["id"] for group in het4_json["groups"]}
    for flow in het4_json["flows"]:
        assert flow["src"] == "source" or flow["src"] in group_ids
        assert flow["dst"] == "sink" or flow["dst"] in group_ids
    for group in het4_json["groups"]:
        layers = [tuple(stage["layers"]) for stage in group["stages"]]
        assert layers[0][0] == 0 and layers[-1][1] == 80  # every stage layout covers Llama-2-70B's 80 layers
        assert all(a[1] == b[0] for a, b in itertools.pairwise(layers))


def test_json_reports_tokens_and_ratios(het4_json: dict[str, Any]) -> None:
    workload = het4_json["workload"]
    assert workload["name"] == "online" and workload["requests"] == 1000
    assert het4_json["tokens_per_s"] == pytest.approx(het4_json["throughput_rps"] * workload["mean_output"])
    assert set(het4_json["baselines"]) == {"distserve", "hexgen", "naive"}
    for baseline in het4_json["baselines"].values():
        if "error" in baseline:
            continue
        assert baseline["ratio"] == pytest.approx(het4_json["throughput_rps"] / baseline["throughput_rps"])
        assert baseline["tokens_per_s"] == pytest.approx(baseline["throughput_rps"] * workload["mean_output"])


def test_same_seed_same_json_from_any_directory(tmp_path: Path) -> None:
    pytest.importorskip("hexgen.coordinator.planner")
    trace = _small_trace(tmp_path)
    args = ("plan", CLUSTERS / "het-1.toml", "--model", "OPT-30B", "--workload", "lphd", "--trace", trace, "--json")
    first, second = node(*args, cwd=tmp_path), node(*args, cwd=ROOT)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["workload"]["name"] == "LPHD"
    for key in ("groups", "flows", "throughput_rps", "bottleneck"):
        assert a[key] == b[key]
    for name in ("distserve", "hexgen", "naive"):
        assert a["baselines"][name].get("throughput_rps") == b["baselines"][name].get("throughput_rps")


def test_help_lists_the_plan_command() -> None:
    run = node("--help")
    assert run.returncode == 0
    assert "plan" in run.stdout
    run = node("plan", "--help")
    assert run.returncode == 0 and "--workload" in run.stdout and "--trace" in run.stdout


def test_installed_entry_point_runs() -> None:
    script = Path(sys.executable).parent / "hexgen-node"
    if not script.exists():
        pytest.skip(f"no installed hexgen-node beside {sys.executable}")
    run = subprocess.run([str(script), "plan", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "CLUSTER.toml" in run.stdout


def _assert_one_line_error(run: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("hexgen-node: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


HOST = '[[hosts]]\nname = "a"\ngpu = "H100"\ncount = 2\n'


@pytest.mark.parametrize(
    ("toml", "fragments"),
    [
        ('[[hosts]]\nname = "a"\ngpu = "V100"\n', ("unknown GPU type 'V100'", "bad.toml")),
        ("name = [\n", ("malformed TOML", "bad.toml")),
        ("colour = 'blue'\n" + HOST, ("unknown key", "colour")),
        (HOST + HOST, ("host 'a' is listed twice",)),
        ('[[hosts]]\nname = "a"\ngpu = "H100"\ncount = 0\n', ("count must be at least 1",)),
        (HOST + '[[links]]\na = "a"\nb = "z"\ngbit_s = 5\n', ("unknown host 'z'",)),
    ],
)
def test_bad_cluster_files(tmp_path: Path, toml: str, fragments: tuple[str, ...]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    _assert_one_line_error(node("plan", path, "--model", "llama-2-7b", "--trace", _small_trace(tmp_path)), *fragments)


def test_missing_cluster_file(tmp_path: Path) -> None:
    _assert_one_line_error(node("plan", tmp_path / "nope.toml", "--model", "llama-2-7b"), "nope.toml", "does not exist")


def test_cluster_path_is_a_directory(tmp_path: Path) -> None:
    _assert_one_line_error(node("plan", tmp_path, "--model", "llama-2-7b"), "is a directory")


def test_cluster_file_not_text(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00name")
    _assert_one_line_error(node("plan", path, "--model", "llama-2-7b"), "binary.toml", "UTF-8")


def test_unknown_model(tmp_path: Path) -> None:
    _assert_one_line_error(node("plan", CLUSTERS / "het-4.toml", "--model", "gpt-9"), "unknown model 'gpt-9'")


def test_bad_model_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "gpt2"}')
    _assert_one_line_error(node("plan", CLUSTERS / "het-4.toml", "--model", config), "unsupported model_type 'gpt2'")


def test_unknown_workload() -> None:
    run = node("plan", CLUSTERS / "het-4.toml", "--model", "llama-2-70b", "--workload", "heavy")
    _assert_one_line_error(run, "unknown workload 'heavy'", "HPLD")


def test_missing_trace(tmp_path: Path) -> None:
    run = node("plan", CLUSTERS / "het-4.toml", "--model", "llama-2-70b", "--trace", tmp_path / "none.csv")
    _assert_one_line_error(run, "none.csv", "--trace")


def test_trace_without_the_columns(tmp_path: Path) -> None:
    trace = tmp_path / "other.csv"
    trace.write_text("a,b\n1,2\n")
    run = node("plan", CLUSTERS / "het-4.toml", "--model", "llama-2-70b", "--trace", trace)
    _assert_one_line_error(run, "other.csv", "expected columns")


def test_workload_class_missing_from_trace(tmp_path: Path) -> None:
    trace = tmp_path / "light.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0000000,10,10\n")
    run = node("plan", CLUSTERS / "het-4.toml", "--model", "llama-2-70b", "--workload", "HPHD", "--trace", trace)
    _assert_one_line_error(run, "no HPHD requests")


def test_cluster_too_small_for_one_replica(tmp_path: Path) -> None:
    pytest.importorskip("hexgen.coordinator.planner")
    path = tmp_path / "tiny.toml"
    path.write_text('[[hosts]]\nname = "desk"\ngpu = "A6000"\n')  # 48 GB cannot hold Llama-2-70B's 138 GB
    run = node("plan", path, "--model", "llama-2-70b", "--trace", _small_trace(tmp_path))
    _assert_one_line_error(run, "tiny.toml", "llama-2-70b")


def test_usage_errors_exit_2() -> None:
    assert node().returncode == 2
    run = node("plan", CLUSTERS / "het-4.toml")  # no --model
    assert run.returncode == 2 and "--model" in run.stderr and "Traceback" not in run.stderr


def test_table_pads_columns_and_aligns_numbers_right() -> None:
    from hexgen.cli.format import table

    lines = table(["name", "req/s"], [["a", "1.5"], ["longer", "12.25"]], right=(1,), indent=1)
    assert lines == [" name    req/s", " a         1.5", " longer  12.25"]


def test_gpu_summary_groups_by_host_in_cluster_order() -> None:
    from hexgen.cli.format import gpu_summary
    from hexgen.coordinator.cluster import HostSpec, build_cluster

    cluster = build_cluster([HostSpec("x", "H100", 2), HostSpec("y", "A6000", 3)])
    assert gpu_summary(cluster, [4, 0, 2, 3]) == "x:H100 x 1, y:A6000 x 3"
    assert gpu_summary(cluster, []) == ""


def test_a_quantized_plan_shows_the_memory_of_each_replica(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = tmp_path / "eight-a100.toml"
    cluster.write_text('[[hosts]]\nname = "a"\ngpu = "A100"\ncount = 8\n')
    trace = _small_trace(tmp_path)
    runs = {}
    for scheme in ("none", "int4"):
        status, out, err = run_main(
            capsys, "plan", cluster, "--model", "llama-2-70b", "--trace", trace, "--json", "--quantize", scheme
        )
        assert status == 0, err
        runs[scheme] = json.loads(out)
    for scheme, run in runs.items():
        spec = dataclasses.replace(MODELS["llama-2-70b"], quantize=scheme_of(scheme))
        assert run["quantize"] == scheme and run["weight_bytes"] == spec.weight_bytes
        for memory in run["replica_memory"]:
            assert memory["weight_bytes"] == pytest.approx(spec.weight_bytes)
            assert memory["max_gpu_weight_bytes"] <= memory["weight_bytes"]
    gpus = {
        scheme: max(sum(len(s["gpus"]) for s in g["stages"]) for g in run["groups"]) for scheme, run in runs.items()
    }
    assert gpus["none"] >= 2 and gpus["int4"] == 1  # 138 GB of fp16 weights need two 80 GB GPUs; 44 GB of int4 fit one
    status, out, _ = run_main(capsys, "plan", cluster, "--model", "llama-2-70b", "--trace", trace, "--quantize", "int4")
    assert status == 0 and "43.83 GB of weights (linear weights: int4)" in out and "per GPU" in out


@pytest.mark.parametrize("command", [["plan", "c.toml", "--model", "llama-2-7b"], ["join"], ["demo"]])
def test_every_command_refuses_a_bad_quantization_in_one_line(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_main(capsys, *command, "--quantize", "fp8")
    assert status == 2 and out == ""
    assert err == "hexgen-node: error: --quantize: unknown quantization 'fp8': choose one of none, int8, int4\n"
