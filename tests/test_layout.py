"""The package layout: dependencies point one way, no private names cross modules."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PACKAGES = ("vsla_jax", "icd_jax", "stablehlo_bridge")


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(name: str, path: pathlib.Path):
    """(imported module, imported names) pairs of first-party imports, function bodies too."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in PACKAGES:
                yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    yield a.name, []


def _graph():
    mods = dict(_modules())
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for target, names in _imports(m, path):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != m:
                    graph[m].add(cand)
                    break
    return graph


def test_no_import_cycles():
    graph = _graph()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            # a package's __init__ re-exporting its own submodules is not a cycle
            if m.startswith(n + ".") or n.startswith(m + ".") and m in PACKAGES + (
                    "vsla_jax.conv", "vsla_jax.attention"):
                continue
            if state.get(n) == "open":
                pytest.fail(f"import cycle: {' -> '.join(stack + [m, n])}")
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_private_names_imported_across_modules():
    bad = []
    for m, path in _modules():
        for target, names in _imports(m, path):
            private = [n for n in names if n.startswith("_")]
            if private or any(p.startswith("_") for p in target.split(".")):
                bad.append(f"{m} imports {target}: {private}")
    assert not bad, bad


def test_tests_use_no_private_names():
    bad = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for target, names in _imports("tests", path):
            if any(n.startswith("_") for n in names):
                bad.append(f"{path.name}: {target} {names}")
    assert not bad, bad


def test_thin_public_init_lists_what_it_exports():
    import vsla_jax as vs

    for name in vs.__all__:
        assert hasattr(vs, name), name
    assert callable(vs.conv) and callable(vs.attention)
