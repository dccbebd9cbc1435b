"""Mutation check: does the suite notice small, plausible bugs?

Usage (``make mutants``; not in CI -- run it before a release, ~5-10 minutes on 2 cores)::

    python tests/mutants.py                 # every mutant
    python tests/mutants.py --list          # names, files, tests
    python tests/mutants.py --only ref_row0_top_p cli_drops_min_p
    python tests/mutants.py --keep          # keep the scratch copy (path printed)

The package (``proxykern/`` with its built ``_C*.so``, and ``kernels/`` through the
``proxykern/kernels`` link) and ``tests/`` are copied once to a scratch folder. Each mutant is
one exact text replacement in one file of that copy; the pattern must occur exactly once
(or the mutant's stated ``count`` times; otherwise the run stops: the mutant list has
gone stale and needs updating). The
mutant's tests then run there with ``PYTHONPATH`` pointing at the copy (checked: the
child imports the copy, not the editable install), the file is restored, and the next
mutant follows. A mutant is *killed* when its tests fail (pytest exit code 1, or 2 for an
error during collection), *survived* when they pass. Before any mutant the union of
the selected tests must pass unmutated (the baseline), else the results would mean
nothing. Exit status 0 when every mutant was killed.

Only Python-level mutants are listed: a C++/CUDA mutant would need a rebuild of the
extension per mutant (minutes each on CI's 2 cores).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str          # in the copy (kernels/ lives at proxykern/kernels/)
    old: str
    new: str
    tests: tuple       # pytest arguments (node ids, -k ...)
    why: str
    count: int = 1     # occurrences of ``old`` expected (all are replaced)


M = Mutant
MUTANTS = [
    M("ext_import_fails", "proxykern/ops.py",
      "from . import _C  # noqa: F401", "from . import _C_gone  # noqa: F401",
      ("tests/test_backends.py",
       "tests/test_generate.py::test_seeded_sampling_reproducible_batch_invariant_and_equal_to_naive"),
      "the C++ extension fails to import: 'auto' and the cpu tests fall back to the reference"),
    M("ref_top_k_unclamped", "proxykern/reference.py",
      "k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)",
      "k = torch.where(k <= 0, torch.full_like(k, V), k)",
      ("tests/test_op_edges.py::test_top_k_beyond_the_vocabulary_keeps_everything",),
      "top_k larger than the vocabulary not clamped in the reference"),
    M("ref_row0_top_p", "proxykern/reference.py",
      "p = top_p.double().reshape(-1, 1)", "p = top_p[:1].double().reshape(-1, 1)",
      ("tests/test_per_row.py", "-k", "torch"),
      "the reference uses row 0's top_p for every row"),
    M("triton_row0_top_p", "proxykern/kernels/proxy_sample_triton.py",
      "top_p = tl.load(top_p_ptr + row)", "top_p = tl.load(top_p_ptr)",
      ("tests/test_per_row.py::test_restrictive_rows_beside_permissive_rows", "-k", "triton"),
      "the Triton kernel uses row 0's top_p for every row"),
    M("triton_row0_temperature", "proxykern/kernels/proxy_sample_triton.py",
      "temp = tl.load(temp_ptr + row)", "temp = tl.load(temp_ptr)",
      ("tests/test_per_row.py::test_restrictive_rows_beside_permissive_rows", "-k", "triton"),
      "the Triton kernel uses row 0's temperature for every row"),
    M("triton_staged_search_not_resumed", "proxykern/kernels/proxy_sample_triton.py",
      "    while phase != 0:\n        pv = _pivots(lo, hi, P)",
      "    while phase == 3:\n        pv = _pivots(lo, hi, P)",
      ("tests/test_ops.py::test_triton_staged_search_resumes_in_the_row_program",),
      "the Triton row program never finishes a search still open (staged rounds ran out)"),
    M("triton_segment_slots_overwrite", "proxykern/kernels/proxy_sample_triton.py",
      "    pos = slot - n_a\n", "    pos = slot\n",
      ("tests/test_ops.py", "-k", "full_blocks_then_tail"),
      "a segment's bracket tokens overwrite the previous segments' slots"),
    M("ops_row0_params", "proxykern/params.py",
      "return value.to(device=device, dtype=dtype).reshape(-1).expand(B).contiguous()",
      "return value[:1].to(device=device, dtype=dtype).expand(B).contiguous()",
      ("tests/test_per_row.py::test_restrictive_rows_beside_permissive_rows", "-k", "cpu"),
      "proxy_sample hands every backend row 0's value of each per-row tensor"),
    M("triton_alpha_sign", "proxykern/kernels/proxy_sample_triton.py",
      "b + alpha * (e - a))", "b - alpha * (e - a))",
      ("tests/test_per_row.py::test_per_row_alpha_greedy", "-k", "triton"),
      "the Triton kernel subtracts the expert's advantage (both combine helpers)", count=2),
    M("ref_neg_inf_rule_base_only", "proxykern/reference.py",
      "excluded = torch.isneginf(b) | torch.isneginf(e) | torch.isneginf(a)",
      "excluded = torch.isneginf(b)",
      ("tests/test_op_edges.py::test_neg_inf_rule_against_the_reference", "-k", "cpu"),
      "the reference excludes only tokens that are -inf in the base"),
    M("ref_step_ignored_in_noise", "proxykern/reference.py",
      "words = philox4x32(v >> 2, step & _MASK32, (step >> 32) & _MASK32,",
      "words = philox4x32(v >> 2, 0 * step, 0 * step,",
      ("tests/test_ops.py::test_same_tokens_as_reference_across_seeds", "-k", "cpu"),
      "the reference's noise ignores the step"),
    M("gen_step_fixed", "proxykern/engine/step.py",
      "self.step_rows.add_(1)", "self.step_rows.add_(0)",
      ("tests/test_generate.py::test_seeded_sampling_reproducible_batch_invariant_and_equal_to_naive",),
      "fused generation draws every token with the noise of step 0"),
    M("gen_finished_status_unmasked", "proxykern/engine/step.py",
      "self.status.bitwise_or_(status.masked_fill(finished, 0))", "self.status.bitwise_or_(status)",
      ("tests/test_generation_edges.py::test_a_finished_rows_bad_logits_are_ignored",),
      "fused generation raises on a finished row's garbage logits"),
    M("naive_finished_status_unmasked", "proxykern/baseline.py",
      "status = status.masked_fill(finished, 0)", "status = status",
      ("tests/test_generation_edges.py::test_a_finished_rows_bad_logits_are_ignored",),
      "naive generation raises on a finished row's garbage logits"),
    M("runner_mask_not_growing", "proxykern/engine/runner.py",
      "if self.length >= self.mask.shape[1]:\n"
      "            self.mask = torch.cat([self.mask, torch.zeros_like(self.mask)], dim=1)",
      "if self.length >= self.mask.shape[1]:\n            pass",
      ("tests/test_generation_edges.py::test_processor_past_its_initial_capacity",),
      "the runner's mask buffer no longer grows (the processor dies after 64 tokens)"),
    M("cli_drops_min_p", "proxykern/apps/cli.py",
      "top_p=args.top_p, min_p=args.min_p,", "top_p=args.top_p,",
      ("tests/test_cli.py::test_min_p_flag_reaches_generation",),
      "the CLI parses --min-p and drops it"),
    M("cli_ignores_dtype", "proxykern/loading.py",
      "p, dtype=dtype, trust_remote_code", "p, trust_remote_code",
      ("tests/test_cli.py::test_dtype_flag_loads_the_models_in_that_dtype",),
      "the CLI parses --dtype and loads the checkpoints' own dtype"),
    M("program_mask_dropped", "proxykern/programs.py",
      "return program_ops.program_rows(inputs, bound.coefficients, mode, bound.mask_input,",
      "return program_ops.program_rows(inputs, bound.coefficients, mode, -1,",
      ("tests/test_program_generate.py::test_presets_match_the_papers_formulas",),
      "the program step forgets the plausibility mask (contrastive decoding unmasked)"),
    M("speculative_program_steps", "proxykern/engine/speculative.py",
      "steps = (n_done[:, None] + torch.arange(P, device=dev)).reshape(-1)",
      "steps = n_done.repeat_interleave(P)",
      ("tests/test_program_generate.py::test_speculative_programs_give_the_plain_tokens",),
      "speculative rounds draw every position with the round's first step (sampled "
      "tokens differ from plain decoding)"),
    M("static_round_steps", "proxykern/engine/static_speculative.py",
      "steps = (n_done[:, None] + cols).reshape(-1)", "steps = n_done.repeat_interleave(P)",
      ("tests/test_static_speculative.py::test_random_models_equal_plain",),
      "static rounds draw every position with the round's first step"),
    M("static_round_pending_rebound", "proxykern/engine/static_speculative.py",
      "self.pending.copy_(y.gather(1, (c - 1).clamp(min=0)[:, None]).squeeze(1).clamp(min=0))",
      "self.pending = y.gather(1, (c - 1).clamp(min=0)[:, None]).squeeze(1).clamp(min=0)",
      ("tests/test_graph_capture_cpu.py::test_captured_rounds_equal_plain_decoding",),
      "the round rebinds its pending token instead of writing it in place: right eagerly, "
      "wrong once captured (a replay reads the old buffer)"),
]


def make_copy(dest: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    # proxykern/kernels links to kernels/: copytree follows the link, so the copy holds the
    # Triton sources as plain files there.
    shutil.copytree(os.path.join(ROOT, "proxykern"), os.path.join(dest, "proxykern"),
                    ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(dest, "tests"), ignore=ignore)
    shutil.copy2(os.path.join(ROOT, "pyproject.toml"), dest)


def child_env(copy: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = copy + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file must never meet a mutant's .pyc
    return env


def check_imports_the_copy(python: str, copy: str) -> None:
    code = ("import proxykern, proxykern.reference, proxykern.kernels.proxy_sample_triton as k; "
            "print(proxykern.__file__); print(k.__file__)")
    out = subprocess.run([python, "-c", code], cwd=copy, env=child_env(copy), check=True,
                         capture_output=True, text=True).stdout.split()
    for path in out:
        if not os.path.realpath(path).startswith(os.path.realpath(copy)):
            sys.exit(f"mutants: the child imports {path}, not the copy in {copy}")


def run_tests(python: str, copy: str, args, timeout: float):
    cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=child_env(copy), capture_output=True,
                              text=True, timeout=timeout)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # The first failing test (pytest -ra summary), else the last lines.
        first = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))][:1]
        rc, tail = proc.returncode, first or lines[-3:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", []
    return rc, time.monotonic() - start, tail


def apply(copy: str, mutant: Mutant) -> str:
    path = os.path.join(copy, mutant.path)
    with open(path) as f:
        original = f.read()
    count = original.count(mutant.old)
    if count != mutant.count:
        sys.exit(f"mutants: {mutant.name}: the pattern occurs {count} times in {mutant.path} "
                 f"(must be exactly {mutant.count}; update the mutant list):\n    {mutant.old!r}")
    with open(path, "w") as f:
        f.write(original.replace(mutant.old, mutant.new))
    return original


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not first run the selected tests unmutated")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:32} {m.path:42} {' '.join(m.tests)}\n{'':32} {m.why}")
        return 0

    def interrupted(*_):  # SIGTERM: stop the child and clean up, as for Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    copy = tempfile.mkdtemp(prefix="proxykern-mutants-")
    try:
        make_copy(copy)
        check_imports_the_copy(args.python, copy)
        for m in mutants:  # every pattern must still be there before spending any time
            with open(os.path.join(copy, m.path)) as f:
                if f.read().count(m.old) != m.count:
                    apply(copy, m)  # exits with the message
        if not args.skip_baseline:
            selected = []
            for m in mutants:
                selected += [a for a in m.tests if a not in selected]
            node_args = [a for a in selected if a.startswith("tests/")]
            print(f"baseline: {len(node_args)} test selections, unmutated ...", flush=True)
            rc, secs, tail = run_tests(args.python, copy, node_args, args.timeout * 2)
            if rc != 0:
                print("\n".join(tail))
                sys.exit(f"mutants: the unmutated baseline fails (pytest exit {rc}); fix that first")
            print(f"baseline: passed in {secs:.0f}s", flush=True)

        rows = []
        print(f"{'mutant':32} {'result':9} {'time':>7}  file", flush=True)
        for m in mutants:
            original = apply(copy, m)
            try:
                rc, secs, tail = run_tests(args.python, copy, m.tests, args.timeout)
            finally:
                with open(os.path.join(copy, m.path), "w") as f:
                    f.write(original)
            result = ("killed" if rc in (1, 2) else "timeout" if rc == "timeout"
                      else "SURVIVED" if rc == 0 else f"error {rc}")
            rows.append((m, result, secs, tail))
            print(f"{m.name:32} {result:9} {secs:6.1f}s  {m.path}", flush=True)
            if result == "killed" and tail:
                print(f"{'':32} by {tail[0][:110]}", flush=True)
    finally:
        if args.keep:
            print(f"scratch copy kept in {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    killed = sum(r[1] in ("killed", "timeout") for r in rows)
    print(f"\n{killed}/{len(rows)} mutants killed")
    for m, result, _, tail in rows:
        if result not in ("killed", "timeout"):
            print(f"  {m.name} ({result}): {m.why}\n    tests: {' '.join(m.tests)}")
            for line in tail:
                print(f"    | {line}")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
