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


def _absolute(name: str, path: pathlib.Path, node: ast.ImportFrom) -> str | None:
    """The absolute module of a ``from ... import`` (relative ones resolved from ``name``)."""
    if node.level == 0:
        return node.module
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else [])) or None


def _imports(name: str, path: pathlib.Path):
    """(imported module, imported names) pairs of first-party imports, function bodies too."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(name, path, node)
            if module and module.split(".")[0] in PACKAGES:
                yield module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    yield a.name, []


def _targets(name: str, path: pathlib.Path, mods) -> set[str]:
    """Every first-party module ``name`` imports (``from m import sub`` counts as ``m.sub``
    when that is a module, and as ``m`` too)."""
    out = set()
    for target, names in _imports(name, path):
        out.add(target)
        out.update(f"{target}.{n}" for n in names if f"{target}.{n}" in mods)
    return out


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


# -- layering: dependencies point down, from the bottom -------------------------------
def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _is_icd_core(module: str) -> bool:
    """icd_jax outside the pipeline (``icd_jax.runtime``) and the command line."""
    return _within(module, "icd_jax") and not (
        _within(module, "icd_jax.runtime") or _within(module, "icd_jax.cli"))


#: (importing module, imported module prefix) pairs a layer rule does not apply to, each
#: with its reason.
LAYER_EXEMPT = {
    ("icd_jax", "icd_jax.runtime"): "the package facade loads icd_jax.run and "
                                    "icd_jax.runtime lazily in its module __getattr__",
}


#: (who: predicate on the importing module, forbidden prefixes, rule) from the bottom up.
LAYERS = [
    (lambda m: _within(m, "vsla_jax"), ("icd_jax", "stablehlo_bridge"),
     "vsla_jax is the bottom layer"),
    (_is_icd_core, ("stablehlo_bridge", "icd_jax.runtime"),
     "the icd_jax core sits below the bridge and the pipeline"),
    (lambda m: _within(m, "stablehlo_bridge"), ("icd_jax.runtime", "icd_jax.models",
                                                "icd_jax.cli"),
     "stablehlo_bridge sits below the pipeline, the models and the CLI"),
    (lambda m: _within(m, "icd_jax.runtime") and m != "icd_jax.runtime.export",
     ("stablehlo_bridge",), "only icd_jax.runtime.export talks to the bridge"),
]


def _layer_violations() -> list[str]:
    mods = dict(_modules())
    bad = []
    for m, path in mods.items():
        targets = _targets(m, path, mods)
        for applies, forbidden, rule in LAYERS:
            if not applies(m):
                continue
            for t in sorted(targets):
                exempt = any(m == who and _within(t, what) for who, what in LAYER_EXEMPT)
                if not exempt and any(_within(t, f) for f in forbidden):
                    bad.append(f"{m} imports {t} ({rule})")
    return bad


@pytest.mark.parametrize("rule", [r for _, _, r in LAYERS])
def test_layers_import_only_downwards(rule):
    bad = [b for b in _layer_violations() if b.endswith(f"({rule})")]
    assert not bad, "\n".join(bad)


def test_layer_rules_see_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import stablehlo_bridge.passes\n"
                   "    from icd_jax.runtime import export\n")
    assert set(_targets("icd_jax.x", src, {})) == {"stablehlo_bridge.passes",
                                                    "icd_jax.runtime"}


# -- private attributes stay in their module -------------------------------------------
#: ``x._name`` accesses allowed although ``_name`` is not defined in the module, each with
#: its reason. (``jax._src`` and other libraries' internals are not allowed.)
PRIVATE_ATTR_ALLOW = {
    "_replace": "namedtuple API (public despite the underscore)",
    "_asdict": "namedtuple API (public despite the underscore)",
    "_fields": "namedtuple API (public despite the underscore)",
    "_make": "namedtuple API (public despite the underscore)",
    "_field_defaults": "namedtuple API (public despite the underscore)",
}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_names(tree: ast.AST) -> set[str]:
    """Every name a module defines: functions, classes, methods, assignment targets
    (``x = ...``, ``self._x = ...``, class attributes), import aliases and arguments."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.alias):
            out.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            out.add(node.arg)
    return out


def _private_accesses(tree: ast.AST) -> list[tuple[int, str, str]]:
    """``(line, expression, attribute)`` of every ``obj._name`` read, as written."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(
                node.ctx, ast.Load):
            out.append((node.lineno, ast.unparse(node), node.attr))
    return out


def _foreign_private_accesses(path: pathlib.Path) -> list[str]:
    """``"file:line: expr"`` for each ``obj._name`` whose ``_name`` the file never defines."""
    tree = ast.parse(path.read_text())
    own = _defined_names(tree)
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [f"{where}:{line}: {expr}" for line, expr, attr in _private_accesses(tree)
            if attr not in own and attr not in PRIVATE_ATTR_ALLOW]


def test_no_private_attributes_used_across_modules():
    bad = [b for _, path in _modules() for b in _foreign_private_accesses(path)]
    assert not bad, "\n".join(bad)


def test_private_attribute_rule_flags_foreign_and_allows_own(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import jax\nclass A:\n    def __init__(self):\n        self._x = 1\n"
                   "    def f(self, other):\n        return self._x + other._x + other._y\n"
                   "def g(t):\n    return t._replace(a=1), jax._src, t.__class__\n")
    found = sorted(b.split(": ", 1)[1] for b in _foreign_private_accesses(src))
    assert found == ["jax._src", "other._y"]


MAX_MODULE_LINES = 700


def test_no_module_over_700_lines():
    long = [f"{m}: {n} lines" for m, path in _modules()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, long


def test_the_stage_machine_stays_small():
    """The module holding the pipeline's stages (the Run state machine) stays under 400
    lines: measurement, gates, fitting and export live in their own modules."""
    n = len((ROOT / "icd_jax" / "runtime" / "stages.py").read_text().splitlines())
    assert n < 400, n


def test_split_model_modules_keep_their_public_names():
    from icd_jax.models import bert, mamba, mamba_model, minilm, packing

    for name in ("BertConfig", "Encoder", "FFNSparsity", "KeyBlockDrop", "Layer", "Linear",
                 "Transforms"):
        assert getattr(minilm, name) is getattr(bert, name), name
    for name in ("PackPolicy", "Packed", "pack"):
        assert getattr(minilm, name) is getattr(packing, name), name
    for name in ("MambaConfig", "MambaLM", "State", "selective_scan", "module", "zero_state",
                 "DEFAULT_CHUNK", "MAMBA_130M"):
        assert getattr(mamba, name) is getattr(mamba_model, name), name
    for mod in (minilm, mamba):
        assert all(hasattr(mod, n) for n in mod.__all__)
