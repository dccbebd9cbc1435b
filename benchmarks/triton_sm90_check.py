"""Compile the Triton kernels for sm_90 without a GPU and report their resources.

For each launch shape below, every kernel :func:`launch_plan` would run is compiled
through Triton's own toolchain (``triton.compile`` for target cuda:90, its bundled
``ptxas`` and ``cuobjdump``) with the launcher's constexprs, bf16 inputs and 16-byte
aligned pointers and row strides (as Triton specializes them for aligned tensors).
Printed per kernel: registers per thread, spilled bytes, shared memory and how many of
its global loads are 16-byte vectors. Exit status 1 if any kernel spills, 2 if the
toolchain is missing. A register or spill regression shows here before any GPU run.

    python benchmarks/triton_sm90_check.py [--vocab 128256] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from proxykern.kernels import proxy_sample_triton as pst  # noqa: E402

# Pointer arguments that are not the fp32 default (the launcher's dtypes).
POINTER_TYPES = {"base_ptr": "*bf16", "expert_ptr": "*bf16", "anti_ptr": "*bf16",
                 "top_k_ptr": "*i64", "seed_ptr": "*i64", "step_ptr": "*i64",
                 "ws_i_ptr": "*i64", "tokens_ptr": "*i64", "st_i_ptr": "*i32",
                 "sg_i_ptr": "*i32", "status_ptr": "*i32"}
# (name, batch, may_filter): the unsplit kernel, pass 1 split only, and the staged search.
SHAPES = [("batch 64", 64, True), ("batch 1, no filter", 1, False), ("batch 1, staged", 1, True)]


def _tool(name: str) -> str | None:
    import triton.backends.nvidia as nvidia
    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def compile_kernel(kernel, consts: dict, num_warps: int) -> dict:
    """One kernel compiled for sm_90: its resources."""
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, "*fp32")
        else:
            signature[name] = "i32"
    aligned = [n for n, t in signature.items() if t.startswith("*") or n.startswith("stride")]
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, enable_fp_fusion=False))
    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        report = subprocess.run([_tool("ptxas"), "-v", f"-arch={arch}", ptx_path, "-o",
                                 os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if report.returncode != 0:
        raise RuntimeError(f"ptxas failed: {report.stderr[-500:]}")
    regs = re.search(r"Used (\d+) registers", report.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report.stderr)
    loads = re.findall(r"ld\.global[^\n;]*", ptx)
    return dict(registers=int(regs.group(1)), spill_store_bytes=int(spill.group(1)),
                spill_load_bytes=int(spill.group(2)), shared_bytes=compiled.metadata.shared,
                global_loads=len(loads), vector16_loads=sum(".v4" in ld for ld in loads))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if _tool("ptxas") is None:
        print("no ptxas (Triton's bundled one or on PATH): cannot compile for sm_90")
        return 2
    cfg = pst.default_config(None, args.vocab)
    rows, seen = [], {}
    for shape, batch, may_filter in SHAPES:
        plan = pst.launch_plan(batch, args.vocab, cfg, may_filter=may_filter)
        for kernel, _grid, consts in plan["kernels"]:
            key = (kernel.fn.__name__, tuple(sorted(consts.items())))
            if key not in seen:
                seen[key] = compile_kernel(kernel, consts, cfg["num_warps"])
            row = dict(shape=shape, kernel=kernel.fn.__name__, **seen[key])
            if row not in rows:
                rows.append(row)
    print(f"Triton {triton.__version__}, sm_90, bf16, vocab {args.vocab}, config {cfg}")
    print("| shape | kernel | registers | spills (store/load bytes) | shared | 16-byte loads |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['kernel']} | {r['registers']} | {r['spill_store_bytes']}/"
              f"{r['spill_load_bytes']} | {r['shared_bytes']} | {r['vector16_loads']} of "
              f"{r['global_loads']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, vocab=args.vocab, config=cfg, rows=rows), f,
                      indent=1)
    spilled = [r["kernel"] for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    if spilled:
        print("spills in: " + ", ".join(sorted(set(spilled))))
        return 1
    print("no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
