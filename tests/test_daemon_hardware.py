"""Node hardware: simulated profiles, --simulate-gpu parsing, strict advert parsing, detection without CUDA."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hexgen.coordinator.specs import GPU_TYPES
from hexgen.daemon.calibration import calibrate_cpu
from hexgen.daemon.hardware import detect, parse_simulate_gpu, simulated_profile
from hexgen.daemon.hardware_profile import GPUInfo, HardwareError, HardwareProfile, known_gpu_type
from hexgen.daemon.messages import MAX_GPUS


def _valid() -> dict[str, Any]:
    return simulated_profile("H100x2").to_dict()


@pytest.mark.parametrize("name", list(GPU_TYPES))
def test_simulated_profile_copies_the_spec_table(name: str) -> None:
    spec = GPU_TYPES[name]
    profile = simulated_profile(f"{name.lower()}x3")
    assert len(profile.gpus) == 3
    for gpu in profile.gpus:
        assert (gpu.type, gpu.memory_gb, gpu.tflops, gpu.hbm_gb_s) == (name, spec.memory_gb, spec.tflops, spec.hbm_gbps)
        assert gpu.simulated and gpu.measured_tflops is None and gpu.measured_hbm_gb_s is None
    assert profile.intra_host_gb_s == spec.intra_host_gbps
    assert profile.cpu_count >= 1 and profile.memory_gb >= 0
    wire = msgpack.unpackb(msgpack.packb(profile.to_dict()), raw=False)
    assert HardwareProfile.from_dict(wire) == profile
    assert "3 x " + name + " (simulated)" in profile.describe()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("H100", ("H100", 1)),
        ("H100x2", ("H100", 2)),
        ("a100X4", ("A100", 4)),
        (" l40x8 ", ("L40", 8)),
        ("A6000x64", ("A6000", 64)),
        ("a6000", ("A6000", 1)),
        ("H100x01", ("H100", 1)),
    ],
)
def test_parse_simulate_gpu(spec: str, expected: tuple[str, int]) -> None:
    assert parse_simulate_gpu(spec) == expected


def test_parse_simulate_gpu_names_the_unknown_type_and_the_known_ones() -> None:
    with pytest.raises(HardwareError) as info:
        parse_simulate_gpu("H200x2")
    assert str(info.value) == "--simulate-gpu: unknown GPU type 'H200'; known: " + ", ".join(GPU_TYPES)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "expected TYPE or TYPExN"),
        ("H100 x2", "expected TYPE or TYPExN"),
        ("H100x-1", "expected TYPE or TYPExN"),
        ("H100x0", "count must be 1..64"),
        ("H100x65", "count must be 1..64"),
        ("H100x99999999999999999999", "count must be 1..64"),
        ("H100x", "unknown GPU type 'H100x'"),
        ("x2", "unknown GPU type"),
        ("H100x2x2", "unknown GPU type 'H100x2'"),
        (None, "expected TYPE or TYPExN"),
    ],
)
def test_parse_simulate_gpu_rejects(spec: Any, fragment: str) -> None:
    with pytest.raises(HardwareError, match="--simulate-gpu") as info:
        parse_simulate_gpu(spec)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA RTX A6000", "A6000"),
        ("h100", "H100"),
        ("NVIDIA L40S", None),
        ("NVIDIA H200", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("", None),
    ],
)
def test_known_gpu_type_maps_device_names(device: str, expected: str | None) -> None:
    found = known_gpu_type(device)
    assert (found.name if found else None) == expected


def test_profile_round_trips_with_measured_figures_and_unknown_devices() -> None:
    profile = HardwareProfile(
        gpus=(
            GPUInfo("H100", 85.0, 989.0, 3350.0, False, "NVIDIA H100 80GB HBM3", 700.0, 2900.0),
            GPUInfo("NVIDIA GeForce RTX 4090", 25.4, 150.0, 900.0, False, "NVIDIA GeForce RTX 4090", 150.0, 900.0),
        ),
        cpu_count=32,
        memory_gb=256.0,
        intra_host_gb_s=20.5,
    )
    assert HardwareProfile.from_dict(profile.to_dict()) == profile
    cpu_only = HardwareProfile(gpus=(), cpu_count=4, memory_gb=0.0)
    assert HardwareProfile.from_dict(cpu_only.to_dict()) == cpu_only
    # Integers are numbers too (msgpack keeps 80 an int); tuples are accepted for lists.
    data = _valid()
    data["gpus"] = tuple(dict(g, memory_gb=80) for g in data["gpus"])
    assert HardwareProfile.from_dict(data).gpus[0].memory_gb == 80.0


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = _valid()
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "hardware",
        {},
        {k: v for k, v in _valid().items() if k != "cpu_count"},
        _valid() | {"extra": 1},
        _with(("gpus",), {"0": 1}),
        _with(("gpus",), [_valid()["gpus"][0]] * (MAX_GPUS + 1)),
        _with(("gpus", 0), "H100"),
        _with(("gpus", 0, "memory_gb"), -1.0),
        _with(("gpus", 0, "memory_gb"), 0),
        _with(("gpus", 0, "memory_gb"), math.nan),
        _with(("gpus", 0, "tflops"), math.inf),
        _with(("gpus", 0, "tflops"), True),
        _with(("gpus", 0, "tflops"), "989"),
        _with(("gpus", 0, "hbm_gb_s"), 1e300),
        _with(("gpus", 0, "measured_tflops"), -5.0),
        _with(("gpus", 0, "simulated"), 1),
        _with(("gpus", 0, "type"), "H200"),  # simulated GPUs name a known type
        _with(("gpus", 0, "type"), ""),
        _with(("gpus", 0, "type"), 7),
        _with(("gpus", 0, "name"), "x" * 1000),
        _with(("gpus", 0, "name"), "bad\nname"),
        _with(("cpu_count",), 0),
        _with(("cpu_count",), 2.0),
        _with(("cpu_count",), 10**30),
        _with(("memory_gb",), -1.0),
        _with(("intra_host_gb_s",), 0.0),
        _with(("intra_host_gb_s",), math.nan),
    ],
)
def test_from_dict_rejects_hostile_input(data: Any) -> None:
    with pytest.raises(HardwareError):
        HardwareProfile.from_dict(data)


_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=8)
)
_ANY = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=20,
)
_GPU_KEYS = ["type", "name", "memory_gb", "tflops", "hbm_gb_s", "simulated", "measured_tflops", "measured_hbm_gb_s"]
_TOP_KEYS = ["gpus", "cpu_count", "memory_gb", "intra_host_gb_s"]


@st.composite
def _near_valid(draw: st.DrawFn) -> Any:
    """A valid profile with a few of its fields replaced by arbitrary values or removed."""
    data = _valid()
    for _ in range(draw(st.integers(1, 3))):
        gpus = data.get("gpus")
        if isinstance(gpus, list) and all(isinstance(g, dict) for g in gpus) and gpus and draw(st.booleans()):
            target = gpus[draw(st.integers(0, len(gpus) - 1))]
            key = draw(st.sampled_from(_GPU_KEYS))
        else:
            key = draw(st.sampled_from(_TOP_KEYS))
            target = data
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(_ANY)
    return data


@settings(max_examples=300, deadline=None)
@given(st.one_of(_ANY, _near_valid()))
def test_from_dict_raises_nothing_but_hardware_error(data: Any) -> None:
    try:
        profile = HardwareProfile.from_dict(data)
    except HardwareError:
        return
    # Whatever is accepted survives a round trip and has sane figures.
    assert HardwareProfile.from_dict(profile.to_dict()) == profile
    assert len(profile.gpus) <= MAX_GPUS
    for gpu in profile.gpus:
        assert all(math.isfinite(x) and x > 0 for x in (gpu.memory_gb, gpu.tflops, gpu.hbm_gb_s))


def test_constructors_validate_too() -> None:
    with pytest.raises(HardwareError):
        GPUInfo("H100", 80.0, -1.0, 3350.0, False, "H100")
    with pytest.raises(HardwareError):
        HardwareProfile(gpus=(simulated_profile("L40").gpus[0],) * (MAX_GPUS + 1), cpu_count=1, memory_gb=1.0)
    with pytest.raises(HardwareError):
        HardwareProfile(gpus=[], cpu_count=1, memory_gb=1.0)  # type: ignore[arg-type]


def test_detect_without_cuda_is_a_quick_cpu_profile() -> None:
    torch = pytest.importorskip("torch")
    started = time.perf_counter()
    profile = detect(calibrate=True, seconds=0.5)
    elapsed = time.perf_counter() - started
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        assert len(profile.gpus) == min(torch.cuda.device_count(), MAX_GPUS)
        assert all(not g.simulated and g.memory_gb > 0 for g in profile.gpus)
        return
    assert profile.gpus == ()
    assert profile.cpu_count >= 1 and profile.memory_gb > 0
    assert elapsed < 8.0
    assert HardwareProfile.from_dict(profile.to_dict()) == profile


@pytest.mark.parametrize("seconds", [0, -1.0, math.nan, math.inf, True, "2"])
def test_calibration_time_must_be_positive(seconds: Any) -> None:
    with pytest.raises(HardwareError):
        detect(seconds=seconds)
    with pytest.raises(HardwareError):
        calibrate_cpu(seconds)


def test_calibrate_cpu_is_positive_and_bounded() -> None:
    calibrate_cpu(0.05)  # numpy imported and warm
    for seconds in (0.1, 0.4):
        started = time.perf_counter()
        gflops, gb_s = calibrate_cpu(seconds)
        elapsed = time.perf_counter() - started
        assert gflops > 0 and gb_s > 0
        assert math.isfinite(gflops) and math.isfinite(gb_s)
        assert elapsed < seconds + 0.25, f"calibrate_cpu({seconds}) took {elapsed:.3f} s"


def test_importing_the_daemon_hardware_modules_does_not_import_torch() -> None:
    code = (
        "import sys; import hexgen.daemon.hardware, hexgen.daemon.cluster_view; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
