"""bench/gpu_check.py's smoke mode: the device check's whole path on CPU with a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_quick(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["finished"]
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"engine-vs-hf", "attention", "prefill->decode"}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["attention"]["detail"]["backend"] == "sdpa"
    assert report["engine_imports"] == {"trio": False, "libp2p": False, "cryptography": False, "jinja2": False}
    assert "prefill->decode" in done.stdout  # the table
