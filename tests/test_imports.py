"""Import hygiene: nothing in the repository shadows another distribution's import name,
and the package's modules import one way.

Every check runs a fresh interpreter with the repository root as its working directory,
the way ``python -m pytest``, ``python -m proxykern.apps.cli`` or a user's ``python -c`` from
a checkout see it (the root is then first on ``sys.path``).
"""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "proxykern"


def _run_at_root(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _top_level_import_names() -> list[str]:
    """Names a process at the root could import from the repository's own folders."""
    names = []
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name == "proxykern":
            continue
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.append(entry.name)
    return names


def test_no_top_level_package_but_proxykern():
    """A regular package at the root (``kernels/__init__.py`` once) wins over any installed
    distribution of that name for every process started at the root."""
    assert _top_level_import_names() == [], (
        "the repository root holds importable packages besides proxykern: "
        f"{_top_level_import_names()} (they shadow installed distributions of that name)")


def test_transformers_and_proxykern_import_at_the_root():
    """transformers imports Hugging Face's ``kernels`` when a model module loads; the
    repository's Triton folder must not be what it finds."""
    code = ("import importlib.util, pathlib\n"
            "from transformers import LlamaForCausalLM\n"
            "import proxykern, proxykern.kernels\n"
            "from proxykern.kernels import proxy_sample_triton\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "origin = spec.origin if spec is not None else None\n"
            "mine = pathlib.Path.cwd().resolve() / 'kernels'\n"
            "assert origin is None or not pathlib.Path(origin).resolve().is_relative_to(mine), origin\n")
    result = _run_at_root("-c", code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_built_package_carries_the_triton_kernels(tmp_path):
    """What a wheel gets: build_py lays proxykern/kernels/ out as plain files."""
    env = dict(os.environ, PROXYKERN_SKIP_CUDA="1")
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                             str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    built = tmp_path / "proxykern" / "kernels" / "proxy_sample_triton.py"
    assert built.is_file() and not built.is_symlink()
    assert built.read_bytes() == (ROOT / "kernels" / "proxy_sample_triton.py").read_bytes()
    assert not (tmp_path / "kernels").exists()


def test_cli_help_runs_at_the_root():
    result = _run_at_root("-m", "proxykern.apps.cli", "generate", "--help")
    assert result.returncode == 0, result.stderr
    assert "--base" in result.stdout


def _module_name(path: pathlib.Path) -> str:
    return ("proxykern." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
            ).removesuffix(".__init__")


def _package_imports(path: pathlib.Path) -> set[str]:
    """The proxykern modules ``path`` imports, at module level or inside functions."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{anchor}.{node.module}" if node.module else anchor
            # ``from pkg import name``: name may be a submodule; ``from . import x`` names no
            # module of its own beyond the package, which is always imported already.
            found.update(f"{target}.{a.name}" for a in node.names)
            if node.module:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {n for n in found if n in modules and n != module}


def _import_graph() -> dict[str, set[str]]:
    return {_module_name(path): _package_imports(path) for path in PACKAGE.rglob("*.py")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules. A package's ``__init__`` importing its own submodules
    is how it exposes them, not a circle, so those edges are left out."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles_inside_the_package():
    cycles = _cycles(_import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle():
    """The check itself fails on a known circle (so it cannot pass vacuously)."""
    graph = _import_graph()
    assert "proxykern.ops" in graph and "proxykern.apps.cli" in graph
    graph["proxykern.ops"] = graph["proxykern.ops"] | {"proxykern.apps.cli"}
    graph["proxykern.apps.cli"] = graph["proxykern.apps.cli"] | {"proxykern.ops"}
    assert _cycles(graph)


#: The package's layers, lowest first: a module imports its own layer and the ones below.
#: ``proxykern`` (the facade) and ``proxykern.lm_eval_model`` (an alias kept for users who
#: import it by that name) sit above everything.
LAYERS = (
    ("core", ("proxykern.models", "proxykern.reference", "proxykern.ops", "proxykern.program_ops",
              "proxykern.params", "proxykern.programs", "proxykern.generation_args",
              "proxykern.outputs", "proxykern.kernels")),
    ("engine", ("proxykern.engine",)),
    ("api", ("proxykern.generate", "proxykern.baseline", "proxykern.scoring",
             "proxykern.program_generate", "proxykern.loading", "proxykern.inflate")),
    ("integrations", ("proxykern.integrations",)),
    ("apps", ("proxykern.apps",)),
    ("facade", ("proxykern", "proxykern.lm_eval_model")),
)


def _layer(module: str) -> int:
    """The index of ``module``'s layer: its longest matching prefix in :data:`LAYERS`."""
    best, best_len = None, -1
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer of LAYERS: place it"
    return best


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
                  for m, targets in graph.items() for t in targets if _layer(t) > _layer(m))


def test_imports_run_down_the_layers():
    """Apps use integrations, the API, the engine and the core; the core imports none of
    them (the layout of docs/api.md's "Layout" and the README's)."""
    assert _upward_imports(_import_graph()) == []


def test_the_layer_check_sees_an_upward_import():
    graph = _import_graph()
    graph["proxykern.ops"] = graph["proxykern.ops"] | {"proxykern.engine.step"}
    assert _upward_imports(graph) == [
        "proxykern.ops (core) imports proxykern.engine.step (engine)"]


def test_import_proxykern_stays_light():
    """``import proxykern`` loads torch and the op, not transformers (imported when a
    generation entry point needs it), vLLM or torch._dynamo (seconds of start-up)."""
    code = ("import sys, proxykern\n"
            "heavy = [m for m in ('transformers', 'vllm', 'torch._dynamo', 'lm_eval')\n"
            "         if m in sys.modules]\n"
            "print(heavy)\n"
            "sys.exit(1 if heavy else 0)\n")
    result = _run_at_root("-c", code)
    assert result.returncode == 0, result.stdout + result.stderr
