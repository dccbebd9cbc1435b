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


def test_kernel_table_ab_columns_include_v06():
    """The A/B columns on synthetic rows (no GPU): v04 / v05 and v05 / v06 replay ratios,
    and v06's bitwise check and launch count from the cuda@graph row."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check
    assert gpu_check.AB_IMPLS == ("cuda_v04@graph", "cuda@graph", "cuda_v06@graph")
    rows = []
    for batch, equal, launches in ((1, True, 1), (256, False, 2)):
        for impl, us in (("naive@graph", 100.0), ("cuda_v04@graph", 30.0), ("cuda@graph", 20.0),
                         ("cuda_v06@graph", 16.0)):
            row = dict(family="randn3", vocab=128256, batch=batch, mode="plain", impl=impl, us=us, gbps=1.0)
            if impl == "cuda@graph":
                row.update(agree_v04=0.998, agree_triton=0.997, v06_equal=equal, v06_launches=launches)
            rows.append(row)
    md = gpu_check.table_markdown(rows, ["naive@graph", *gpu_check.AB_IMPLS], ["# Kernel table"], 4.0)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| inputs"))
    for column in ("cuda_v06@graph us", "v04 / v05 (A/B)", "v05 / v06 (A/B)", "v06 == v05 (bits)",
                   "v06 launches"):
        assert f" {column} |" in header
    one, two = (next(line for line in lines if line.startswith(f"| randn3 | 128256 | {b} |")) for b in (1, 256))
    assert "| 1.50x | 1.25x | 25% | 0.998 | 0.997 | yes | 1 |" in one
    assert one.endswith("| yes | 1 |") and two.endswith("| NO | 2 |")
    assert all(line.count("|") == header.count("|") for line in (one, two))
