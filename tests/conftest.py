"""Shared pytest setup: GPU tests skip without CUDA; Triton runs through its interpreter on CPU.

Required backends (``op_cases.required_backends``): the suite knows which fused backends
must exist where it runs -- ``cpu`` and ``triton`` always, ``cuda`` on a GPU machine with
a CUDA torch (or with ``PROXYKERN_REQUIRE_CUDA=1``). A missing one fails the run: its
parametrized tests fail with the import error, ``test_backends.py`` names it, the header
and the summary print why, and ``"auto"`` falling back from it is an error in every test
(no test can quietly compare the reference with itself).
"""
import os
import re
import warnings

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Triton reads TRITON_INTERPRET when its kernels are defined, so set it before any
# test imports proxykern.kernels: on a machine without a GPU it runs on CPU tensors.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from proxykern import ops  # noqa: E402  (after TRITON_INTERPRET)
from op_cases import missing_required_backends, required_backends  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _required_summary():
    return ", ".join(f"{b} ({d})" for d in ("cpu", "cuda") for b in required_backends(d))


#: Distributions whose resolved versions head every run: CI resolves the newest allowed,
#: so when one moves and breaks something the log names it.
REPORTED_DISTRIBUTIONS = ("torch", "transformers", "triton", "lm_eval", "kernels", "tokenizers")


def _resolved_versions() -> str:
    from importlib import metadata
    found = []
    for name in REPORTED_DISTRIBUTIONS:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def pytest_sessionstart(session):
    """The resolved versions first, even under ``-q`` (which hides the report header)."""
    reporter = session.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"resolved versions: {_resolved_versions()}")


def pytest_report_header(config):
    lines = [f"proxykern required backends: {_required_summary()}"]
    for backend, device, reason in missing_required_backends():
        lines.append(f"proxykern MISSING required backend {backend!r} on {device}: {reason}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    missing = missing_required_backends()
    if missing:
        terminalreporter.section("proxykern: required backends missing", sep="=", red=True,
                                 bold=True)
        for backend, device, reason in missing:
            terminalreporter.line(f"{backend} ({device}): {reason}", red=True)


@pytest.fixture(autouse=True)
def _fallback_from_a_required_backend_is_an_error(monkeypatch):
    """``backend="auto"`` silently running the reference instead of a required kernel
    fails the test (the op warns once per process, so the memory of that is reset)."""
    preferred = [b for b in ("cpu", "cuda") if b in required_backends(b)]
    monkeypatch.setattr(ops, "_warned_fallbacks", set())
    with warnings.catch_warnings():
        if preferred:
            warnings.filterwarnings(
                "error", category=RuntimeWarning,
                message=r"proxykern: backend (%s) is unavailable" % "|".join(
                    re.escape(repr(b)) for b in preferred))
        yield
