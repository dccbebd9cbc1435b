"""The Triton kernels compile for sm_90 without a GPU, with no register spills.

benchmarks/triton_sm90_check.py compiles every kernel the launcher would run (unsplit,
pass 1 split, search staged) with Triton's own toolchain; a spill or a lost 16-byte load
shows here, on CPU, before any GPU run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {"_proxy_sample_kernel", "_segment_kernel", "_plan_kernel", "_pivot_segment_kernel",
           "_pivot_fold_kernel", "_last_segment_kernel"}


def test_triton_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sm90.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_sm90_check.py"),
                           "--vocab", "151936", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
    # Pass 1 and the last pass read their three inputs with 16-byte vector loads.
    for name in ("_segment_kernel", "_last_segment_kernel"):
        assert all(r["vector16_loads"] >= 3 for r in rows if r["kernel"] == name), name
