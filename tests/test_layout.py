"""The package's architecture as a test: import layers run one way (function-level imports included), no import
circle, every subpackage installed, and nothing installed under the name `sharding`."""

from __future__ import annotations

import ast
import os
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dsv3_jax"

# Lower layers never import higher ones. Rooms on one layer may not import each other either.
LAYERS = (
    ("dsv3_jax.errors",),
    ("dsv3_jax.config",),
    ("dsv3_jax.quant",),
    ("dsv3_jax.model",),
    ("dsv3_jax.text",),
    ("dsv3_jax.infer", "dsv3_jax.train", "dsv3_jax.ckpt"),
    ("dsv3_jax.parallel",),
    ("dsv3_jax.plan",),
    ("dsv3_jax.cli",),
)
ROOM_LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _room(module: str) -> str | None:
    return next((r for r in sorted(ROOM_LAYER, key=len, reverse=True) if module == r or module.startswith(r + ".")),
                None)


def _imports(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its body (module level and inside functions)."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not (is_pkg and target.startswith(name + ".")):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_layers_import_one_way():
    bad = []
    for module, targets in _graph().items():
        room = _room(module)
        if room is None:  # the package root re-exports lazily
            continue
        for target in targets:
            other = _room(target)
            if other is None or other == room:
                continue
            if ROOM_LAYER[other] >= ROOM_LAYER[room]:
                bad.append(f"{module} imports {target} ({other} is not below {room})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


def test_every_subpackage_is_installed_and_sharding_is_data():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert set(setup["packages"]) == on_disk | {"dsv3_jax.parallel.tables"}
    assert setup["package-dir"] == {"dsv3_jax.parallel.tables": "sharding"}
    sharding = ROOT / "sharding"
    assert sorted(p.name for p in sharding.iterdir() if not p.name.startswith(("__pycache__", "."))) == [
        "__init__.py", "layouts.toml"]
    assert not [n for n in ast.walk(ast.parse((sharding / "__init__.py").read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_layouts_are_read_from_the_table():
    from dsv3_jax.parallel import LAYOUTS

    table = tomllib.loads((ROOT / "sharding" / "layouts.toml").read_text())
    assert list(LAYOUTS) == list(table["layouts"])
    assert LAYOUTS["cpu-8"].rules_dict["act_batch"] == ("data", "expert")
    assert LAYOUTS["single"].rules_dict["expert"] is None


def test_error_classes_live_in_errors():
    defined = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                defined.append(f"{os.path.relpath(path, ROOT)}: {node.name}")
    assert not defined, defined
