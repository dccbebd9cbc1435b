"""The fused N-input logit-program op (proxykern.program_ops.program_rows) against the
spec, reference.program_reference, on every CPU-side backend: the C++ kernel ("cpu"),
the Triton kernel through its interpreter ("triton"), and the torch reference."""
import os

import pytest
import torch

from proxykern import ops, program_ops, reference
from proxykern.params import SamplingParams
from proxykern.programs import LogitProgram, ProgramMask
from proxykern.reference import STATUS_NONFINITE

BACKENDS = ["cpu", "triton", "torch"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU = torch.device("cpu")

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=11)
SAMPLED = dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, seed=11)
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5)  # the unfiltered path
SAMPLINGS = {"greedy": GREEDY, "sampled": SAMPLED, "plain": PLAIN}


def build_params(sampling, B, V, device=CPU):
    """The op's per-row parameters: the SamplingParams and its tensors by name."""
    p = SamplingParams.build(sampling, B, device, V)
    return p, {n: getattr(p, n) for n in ("alpha", "temperature", "top_k", "top_p", "min_p",
                                          "seed")}


def sizes(backend):
    """(B, vocab_size): the interpreter is slow, so Triton gets a small vocabulary; the C++
    kernel a vocabulary of several 8192-column chunks."""
    return (4, 700) if backend == "triton" else (4, 12000)


def make_inputs(N, B, V, *, seed, extra=(0, 3, 7, 1, 0, 5, 2, 9)):
    """N logit tensors of mixed dtypes, each wider than V by its own margin, with -inf
    columns (one row wholly -inf in one input past column V/2)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(N):
        x = torch.randn(B, V + extra[i], generator=g) * 3.0
        x[:, (i * 37 + 5) % V] = float("-inf")
        x[i % B, (i * 101 + 13) % V] = float("-inf")
        out.append(x.to(DTYPES[i % len(DTYPES)]))
    return out


def per_row(B, *, seed, lo=-1.5, hi=1.5):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(B, generator=g)


def check(got, ref, exact=False):
    tokens, logprobs, lse, status = (t.cpu() for t in got)
    assert torch.equal(status, ref[3]), (status, ref[3])
    assert torch.equal(tokens, ref[0]), (tokens, ref[0])
    if exact:
        assert torch.equal(logprobs, ref[1]) and torch.equal(lse, ref[2])
    else:
        torch.testing.assert_close(lse, ref[2], rtol=2e-5, atol=2e-4, equal_nan=True)
        ok = status == 0
        torch.testing.assert_close(logprobs[ok], ref[1][ok], rtol=2e-5, atol=2e-4)


def run_both(program, inputs, roles, coefficients, mode, mask_input, log_a, sampling, V,
             backend, step=3, device=CPU):
    """The op on ``device`` (inputs moved there) and the reference on the CPU inputs."""
    B = inputs[0].shape[0]
    obj, params = build_params(sampling, B, V)
    on = build_params(sampling, B, V, device)[0]
    steps = torch.full((B,), step, dtype=torch.int64)
    got = program_ops.program_rows(
        [x.to(device) for x in inputs], coefficients.to(device), mode, mask_input,
        None if log_a is None else log_a.to(device), on, steps.to(device), V, backend)
    logits = {r: x for r, x in zip(roles, inputs)}
    ref = reference.program_reference(program, logits, params["temperature"], params["top_k"],
                                      params["top_p"], params["min_p"], params["seed"], steps, V)
    return got, ref


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("N", [2, 3, 5, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_matches_program_reference(backend, N, masked, sampling):
    if backend == "triton" and sampling == "plain" and N != 3:
        pytest.skip("the interpreter is slow: the plain path once is enough")
    B, V = sizes(backend)
    inputs = make_inputs(N, B, V, seed=N)
    roles = tuple(f"m{i}" for i in range(N))
    coef = torch.stack([per_row(B, seed=10 * N + i) for i in range(N)], dim=1)  # (B, N)
    a = per_row(B, seed=99, lo=0.05, hi=0.5)
    r = (N - 1) if masked else -1
    mask = ProgramMask("plausibility", roles[r], a) if masked else None
    program = LogitProgram(roles, coefficients=tuple(coef[:, i] for i in range(N)), mask=mask)
    got, ref = run_both(program, inputs, roles, coef, "linear", r,
                        torch.log(a) if masked else None, SAMPLINGS[sampling], V, backend)
    check(got, ref)


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("mask_role", [None, "b", "e", "a"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_difference_matches_program_reference(backend, mask_role, sampling):
    if backend == "triton" and sampling == "plain" and mask_role not in (None, "e"):
        pytest.skip("the interpreter is slow")
    B, V = sizes(backend)
    inputs = make_inputs(3, B, V, seed=7)
    roles = ("b", "e", "a")
    s = per_row(B, seed=3, lo=-2.0, hi=2.0)
    a = per_row(B, seed=4, lo=0.05, hi=0.5)
    mask = ProgramMask("plausibility", mask_role, a) if mask_role else None
    program = LogitProgram(roles, difference=("b", "e", "a", s), mask=mask)
    r = roles.index(mask_role) if mask_role else -1
    got, ref = run_both(program, inputs, roles, s.reshape(B, 1), "difference", r,
                        torch.log(a) if mask_role else None, SAMPLINGS[sampling], V, backend)
    check(got, ref)


@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_difference_with_a_repeated_input(backend, sampling):
    """O'Brien & Lewis's contrastive decoding: inputs (e, e, a), z = L_e + beta (L_e - L_a),
    masked by the expert's plausibility set."""
    B, V = sizes(backend)
    e, am = make_inputs(2, B, V, seed=21)
    beta = per_row(B, seed=5, lo=0.1, hi=1.0)
    a = per_row(B, seed=6, lo=0.05, hi=0.5)
    program = LogitProgram(("expert", "amateur"), difference=("expert", "expert", "amateur", beta),
                           mask=ProgramMask("plausibility", "expert", a))
    obj, params = build_params(SAMPLINGS[sampling], B, V)
    steps = torch.full((B,), 2, dtype=torch.int64)
    got = program_ops.program_rows([e, e, am], beta.reshape(B, 1), "difference", 0, torch.log(a),
                                   obj, steps, V, backend)
    ref = reference.program_reference(program, {"expert": e, "amateur": am},
                                      params["temperature"], params["top_k"], params["top_p"],
                                      params["min_p"], params["seed"], steps, V)
    check(got, ref)


@pytest.mark.parametrize("sampling", ["greedy", "sampled", "plain"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_difference_is_proxy_sample_bitwise(backend, sampling):
    """Unmasked difference mode on (b, e, a) is the fused 3-input op, bit for bit."""
    B, V = sizes(backend)
    b, e, a = make_inputs(3, B, V, seed=31)
    alpha = per_row(B, seed=8, lo=-2.0, hi=2.0)
    obj, _ = build_params(dict(SAMPLINGS[sampling], alpha=alpha), B, V)
    steps = torch.full((B,), 4, dtype=torch.int64)
    got = program_ops.program_rows([b, e, a], alpha.reshape(B, 1), "difference", -1, None,
                                   obj, steps, V, backend)
    want = ops.sample_rows(b, e, a, obj, steps, V, backend)
    for g, w in zip(got, want):
        assert torch.equal(g, w), (g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows_get_the_status_bit(backend):
    """NaN in a combined input, +inf in the mask input (that row is not masked), NaN hidden
    by the mask (masked tokens are -inf whatever z was), a row wholly -inf: the reference's
    statuses, token -1 for the bad rows."""
    B, V = 5, (300 if backend == "triton" else 3000)
    inputs = make_inputs(3, B, V, seed=41)
    x1 = inputs[1].float()
    inputs[0][1, int(x1[1, :V].argmax())] = float("nan")  # a token the mask keeps
    inputs[1][2, 40] = float("inf")
    inputs[2][3, :] = float("-inf")
    low = int(x1[4, :V].argmin())  # a token the mask surely drops in row 4
    inputs[0][4, low] = float("nan")
    roles = ("p", "q", "r")
    coef = torch.stack([per_row(B, seed=50 + i) for i in range(3)], dim=1)
    coef[:, 1] = coef[:, 1].abs() + 0.1  # row 2's +inf stays +inf in z
    a = torch.full((B,), 0.3)
    program = LogitProgram(roles, coefficients=tuple(coef[:, i] for i in range(3)),
                           mask=ProgramMask("plausibility", "q", a))
    for sampling in ("greedy", "sampled"):
        got, ref = run_both(program, inputs, roles, coef, "linear", 1, torch.log(a),
                            SAMPLINGS[sampling], V, backend)
        check(got, ref)
        status = got[3].cpu()
        assert status[1] & STATUS_NONFINITE and status[2] & STATUS_NONFINITE
        assert status[3] != 0 and status[0] == 0 and status[4] == 0
        assert (got[0].cpu()[[1, 2, 3]] == -1).all()


def test_cpu_small_batch_split_path_and_per_row_temperatures():
    """B = 1 (the CPU kernel splits a row's chunks across threads) and B = 3 with per-row
    temperatures and filters, a wide vocabulary, bf16 everywhere."""
    for B in (1, 3):
        V = 40000
        inputs = [x.to(torch.bfloat16) for x in make_inputs(5, B, V, seed=61)]
        roles = tuple(f"m{i}" for i in range(5))
        coef = torch.stack([per_row(B, seed=70 + i) for i in range(5)], dim=1)
        a = per_row(B, seed=77, lo=0.01, hi=0.2)
        program = LogitProgram(roles, coefficients=tuple(coef[:, i] for i in range(5)),
                               mask=ProgramMask("plausibility", "m2", a))
        sampling = dict(temperature=torch.linspace(0.0, 1.2, B), top_k=torch.tensor([0, 30, 0])[:B],
                        top_p=torch.tensor([0.8, 1.0, 0.95])[:B], min_p=0.0, seed=3)
        got, ref = run_both(program, inputs, roles, coef, "linear", 2, torch.log(a), sampling, V,
                            "cpu")
        check(got, ref)


def test_program_rows_traces_with_fullgraph():
    B, V = 3, 500
    inputs = make_inputs(3, B, V, seed=81)
    coef = torch.stack([per_row(B, seed=90 + i) for i in range(3)], dim=1)
    log_a = torch.log(torch.full((B,), 0.2))
    params, _ = build_params(SAMPLED, B, V)
    steps = torch.zeros(B, dtype=torch.int64)

    def step(x0, x1, x2, c, la, steps):
        return program_ops.program_rows([x0, x1, x2], c, "linear", 1, la, params, steps, V, "cpu")

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(*inputs, coef, log_a, steps)
    want = step(*inputs, coef, log_a, steps)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_triton_runs_under_the_interpreter_here():
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs on CPU-only machines")
    assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("N", [3, 5])
@pytest.mark.parametrize("B", [4, 64])
def test_the_triton_program_kernel_on_cuda(B, N, masked, sampling):
    """backend "cuda" (the Triton kernels on the GPU): the reference's tokens, at a small
    batch (the staged launches) and a large one (one program per row)."""
    V = 50000
    inputs = make_inputs(N, B, V, seed=N + B)
    roles = tuple(f"m{i}" for i in range(N))
    coef = torch.stack([per_row(B, seed=10 * N + i) for i in range(N)], dim=1)
    a = per_row(B, seed=98, lo=0.05, hi=0.5)
    r = 0 if masked else -1
    mask = ProgramMask("plausibility", roles[r], a) if masked else None
    program = LogitProgram(roles, coefficients=tuple(coef[:, i] for i in range(N)), mask=mask)
    got, ref = run_both(program, inputs, roles, coef, "linear", r,
                        torch.log(a) if masked else None, SAMPLINGS[sampling], V, "cuda",
                        device=torch.device("cuda"))
    check(got, ref)
