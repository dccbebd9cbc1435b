"""benchmarks/gpu_check.py (``make gpu-check``) runs: its dry run needs no GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path), PYTHONUNBUFFERED="1")
    env.pop("GPU_CHECK_KEEP_GOING", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status == {"device": "ok", "build": "skipped", "sanitizer": "skipped",
                      "tests": "skipped", "kernels": "ok", "generate": "skipped"}
    assert all(s["detail"] for s in summary["stages"] if s["status"] == "skipped")
    # The summary is printed last; the kernel table went through the same code as on a GPU.
    assert "gpu-check summary" in proc.stdout.strip().splitlines()[-8]
    table = json.loads((tmp_path / "kernel_table.json").read_text())
    assert {r["impl"] for r in table["rows"]} >= {"naive"} and table["copy_gbps"] > 0
    assert all("us" in r for r in table["rows"])
    assert (tmp_path / "kernel_table.md").read_text().startswith("# Kernel table")


def test_gpu_check_without_a_gpu_fails_first_stage(tmp_path):
    """Not a dry run and no GPU: the device stage fails and the rest does not run."""
    import torch
    if torch.cuda.is_available():
        return
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path))
    env.pop("GPU_CHECK_DRY", None)
    env.pop("GPU_CHECK_KEEP_GOING", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status["device"] == "failed" and status["build"] == "not run"
