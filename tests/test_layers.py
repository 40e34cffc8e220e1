"""The import layers of ``passk_jax`` (docs/architecture.md, "Direction of imports"), read from the source:
every import statement, function-level ones included. The library never imports the run layer
(``passk_jax.run``), no module imports one on a higher floor, and the import graph has no cycle."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "passk_jax")

# Lowest floor first; a module may import modules of its own floor or of lower ones. A name ending in "."
# is a package prefix.
FLOORS = (
    ("passk_jax.parallel", "passk_jax.timing", "passk_jax.optim", "passk_jax.hlo", "passk_jax.metrics", "passk_jax.registry",
     "passk_jax.tokenizer", "passk_jax.sampling_ops", "passk_jax.rl.packing", "passk_jax.rl.losses",
     "passk_jax.models.families", "passk_jax.__init__", "passk_jax.rl.__init__", "passk_jax.models.__init__"),
    ("passk_jax.advantages", "passk_jax.models.attention", "passk_jax.tasks."),
    ("passk_jax.models.transformer",),
    ("passk_jax.models.hf", "passk_jax.models.lora", "passk_jax.sampling.", "passk_jax.rl.batch"),
    ("passk_jax.rl.step", "passk_jax.rl.rollout"),
    ("passk_jax.rl.packed_step",),
    ("passk_jax.run.",),
)


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), os.path.dirname(PACKAGE))[:-3]
                out[rel.replace(os.sep, ".")] = os.path.join(root, name)
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    if name in MODULES:
        return name
    if name + ".__init__" in MODULES:
        return name + ".__init__"
    return None


def _imports(module: str) -> set[str]:
    """The passk_jax modules ``module`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    tree = ast.parse(open(MODULES[module]).read())
    package = module.rsplit(".", 1)[0] if not module.endswith("__init__") else module[: -len(".__init__")]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if _resolve(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target and name.startswith("passk_jax") and target != module:
                out.add(target)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _floor(module: str) -> int:
    for i, floor in enumerate(FLOORS):
        if any(module == m or (m.endswith(".") and module.startswith(m)) for m in floor):
            return i
    raise AssertionError(f"{module} is on no floor of tests/test_layers.py: place it in FLOORS")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_floor(module):
    up = sorted(t for t in GRAPH[module] if _floor(t) > _floor(module))
    assert not up, f"{module} (floor {_floor(module)}) imports {up} from a higher floor"


def test_the_library_never_imports_the_run_layer():
    bad = {m: sorted(t for t in ts if t.startswith("passk_jax.run.")) for m, ts in GRAPH.items()
           if not m.startswith("passk_jax.run.")}
    assert not {m: ts for m, ts in bad.items() if ts}


def test_no_import_cycle():
    """Tarjan's strongly connected components: every one a single module."""
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
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
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
