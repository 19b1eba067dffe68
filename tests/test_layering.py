"""The package's layers: every import, at module level or inside a function, goes to the
importing module's own layer or one below; the import graph has no circle; the few imports
that still climb are listed here by name (at most 2), so a new one fails this test.

Layers, lowest first (a module belongs to the first layer whose pattern matches its name):

0. base: errors, the config loader, plain data types (``roles``), run directories.
1. runtime: the one package that talks to torch_xla.
2. declarations (torch-free): the config trees and each kind's config module, the memory
   model and the model-shape / mesh readers, the reward functions.
3. libraries: models, data, losses, generation, checkpoints, tracking, the pre-flight checks.
4. trainers: the registry, the trainers, the start-up check driver.
5. entry points: ``python -m torchxla_rlhf[.KIND]``, the pod launcher.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "torchxla_rlhf"

LAYERS = [
    ("base", ["", "errors", "roles", "configs.loader", "remote", "libtpu_flags", "run_dir"]),
    ("runtime", ["runtime", "runtime.*"]),
    ("declarations", ["configs", "configs.*", "preflight", "preflight.mesh", "preflight.shapes",
                      "preflight.memory_plan", "data.synthetic", "algos", "algos.verifiers",
                      "algos.verifiers.*", "aot", "aot.compile", "aot.verdict"]),
    ("libraries", ["algos.*", "models", "models.*", "generation", "tracking", "checkpoint",
                   "checkpoint.*", "data", "data.*", "preflight.checks"]),
    ("trainers", ["trainers", "trainers.*", "preflight.startup", "preflight.stages", "aot.trace"]),
    ("entry points", ["__main__", "sft", "dpo", "reward", "ppo", "grpo", "launch"]),
]

CLIMBING = {
    ("runtime.mesh", "preflight.mesh"),  # the one parse of mesh_dim, shared with plan
}
"""Imports allowed to go up a layer (importer, imported)."""


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module a dotted name is (or lies in), relative to the package."""
    if name != "torchxla_rlhf" and not name.startswith("torchxla_rlhf."):
        return None
    name = name.removeprefix("torchxla_rlhf").removeprefix(".")
    while name not in MODULES:
        if not name:
            return None
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> set[str]:
    """Package modules ``module`` imports anywhere in its file (``from pkg import sub``: the
    submodule, not ``pkg``)."""
    path = MODULES[module]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = ".".join(x for x in ("torchxla_rlhf", pkg, base) if x)
            names = [f"{base}.{a.name}" if _resolve(f"{base}.{a.name}") == (
                f"{base}.{a.name}".removeprefix("torchxla_rlhf.")) else base for a in node.names]
        else:
            continue
        out |= {m for n in names if (m := _resolve(n)) is not None and m != module}
    return out


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"torchxla_rlhf.{module} is in no layer: add it to LAYERS")


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_the_import_graph_has_no_circle():
    assert _cycles(GRAPH) == []
    # The walk sees function-level imports and would see a circle:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert "trainers.registry" in GRAPH["__main__"]  # imported inside a function there


def test_imports_go_down_the_layers():
    climbing = {(m, d) for m, deps in GRAPH.items() for d in deps if layer_of(d) > layer_of(m)}
    assert climbing == CLIMBING
    assert len(CLIMBING) <= 2


def test_plain_data_types_import_nothing_of_the_package():
    assert GRAPH["roles"] == set()
    assert layer_of("roles") == 0
