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


def _ab_rows():
    """Synthetic rows of two cells (no GPU): v06 equal at batch 1 and not at 256, v07 the
    other way round, so each bits column must read its own variant's flag."""
    rows = []
    for batch, v06, launches, v07, spread in ((1, True, 1, False, 16), (256, False, 2, True, 1)):
        for impl, us in (("naive@graph", 100.0), ("cuda_v04@graph", 30.0), ("cuda@graph", 20.0),
                         ("cuda_v06@graph", 16.0), ("cuda_v07@graph", 8.0)):
            row = dict(family="randn3", vocab=128256, batch=batch, mode="plain", impl=impl, us=us, gbps=1.0)
            if impl == "cuda@graph":
                row.update(agree_v04=0.998, agree_triton=0.997, v06_equal=v06, v06_launches=launches,
                           v07_equal=v07, v07_spread=spread)
            rows.append(row)
    return rows


def test_kernel_table_ab_columns_include_v06_and_v07():
    """The A/B columns on synthetic rows (no GPU): v04 / v05, v05 / v06 and v05 / v07
    replay ratios, v06's and v07's bitwise checks, v06's launch count and v07's spread
    from the cuda@graph row."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check
    assert gpu_check.AB_IMPLS == ("cuda_v04@graph", "cuda@graph", "cuda_v06@graph", "cuda_v07@graph")
    md = gpu_check.table_markdown(_ab_rows(), ["naive@graph", *gpu_check.AB_IMPLS], ["# Kernel table"], 4.0)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| inputs"))
    for column in ("cuda_v06@graph us", "cuda_v07@graph us", "v04 / v05 (A/B)", "v05 / v06 (A/B)",
                   "v05 / v07 (A/B)", "v06 == v05 (bits)", "v06 launches", "v07 == v05 (bits)",
                   "v07 spread"):
        assert f" {column} |" in header
    one, two = (next(line for line in lines if line.startswith(f"| randn3 | 128256 | {b} |")) for b in (1, 256))
    assert "| 1.50x | 1.25x | 2.50x | 25% | 0.998 | 0.997 | yes | 1 | NO | 16 |" in one
    assert one.endswith("| yes | 1 | NO | 16 |") and two.endswith("| NO | 2 | yes | 1 |")
    assert all(line.count("|") == header.count("|") for line in (one, two))


def test_kernels_stage_fails_where_v06_or_v07_is_not_v05():
    """Each (cell, variant) whose outputs were not v05's bits is one line (the stage fails
    on any); cells without the check (a failed agreement) are not counted."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check
    rows = _ab_rows() + [dict(family="lm", vocab=32000, batch=8, mode="plain", impl="cuda@graph", us=1.0)]
    assert gpu_check.differs_from_v05(rows) == ["v07 != v05: randn3 128256x1 plain",
                                                "v06 != v05: randn3 128256x256 plain"]
    assert gpu_check.differs_from_v05(rows[-1:]) == []
