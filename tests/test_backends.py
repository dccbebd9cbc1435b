"""Every backend the suite must test here exists (see ``op_cases.required_backends``)."""
import pytest
import torch

from proxykern import ops
from op_cases import cuda_required, required_backends

REQUIRED = [(b, d) for d in ("cpu", "cuda") for b in required_backends(d)]


@pytest.mark.parametrize("backend,device", REQUIRED, ids=[f"{b}-{d}" for b, d in REQUIRED])
def test_required_backend_is_available(backend, device):
    reason = ops.backend_unavailable_reason(backend, torch.device(device))
    assert reason is None, f"required backend {backend!r} on {device} cannot run: {reason}"


def test_cpu_and_triton_are_always_required():
    on_cpu = required_backends("cpu")
    assert "cpu" in on_cpu
    assert "triton" in (on_cpu if not torch.cuda.is_available() else required_backends("cuda"))
    if torch.cuda.is_available() and cuda_required():
        assert "cuda" in required_backends("cuda")


def test_cuda_required_follows_the_environment(monkeypatch):
    monkeypatch.setenv("PROXYKERN_REQUIRE_CUDA", "1")
    assert cuda_required() and required_backends("cuda")[0] == "cuda"
    monkeypatch.setenv("PROXYKERN_REQUIRE_CUDA", "0")
    assert not cuda_required() and "cuda" not in required_backends("cuda")
    monkeypatch.delenv("PROXYKERN_REQUIRE_CUDA")
    monkeypatch.setenv("PROXYKERN_SKIP_CUDA", "1")
    assert not cuda_required()


def test_auto_falling_back_from_a_required_backend_fails_the_test(monkeypatch):
    """The conftest's guard: a silent fallback to the reference is an error, not a warning."""
    monkeypatch.setattr(ops, "backend_unavailable_reason",
                        lambda b, d: "pretend it is missing" if b == "cpu" else None)
    base = torch.randn(2, 10)
    with pytest.raises(RuntimeWarning, match="pretend it is missing"):
        ops.proxy_sample(base, base, base)
