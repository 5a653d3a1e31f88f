"""The package's layers point one way: core <- transforms <- pipelines <- app.

Read from the code itself (every import statement, function-level ones too), so a
module that reaches up a layer, or a core module that pulls in Beam or TensorFlow,
fails here before anyone has to find it by reading.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clusmar_beam"
LAYERS = ["core", "transforms", "pipelines", "app"]
# What a layer may not import besides the layers above it.
FORBIDDEN_LIBRARIES = {"core": ("apache_beam", "tensorflow", "keras")}


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "clusmar_beam" and len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return None


def _modules(layer):
    return sorted((PACKAGE / layer).rglob("*.py"))


def test_every_module_is_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside core/transforms/pipelines/app: {loose}"


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_downwards(layer):
    above = set(LAYERS[LAYERS.index(layer) + 1:])
    problems = []
    for path in _modules(layer):
        for line, module in _imports(path):
            target = _layer_of(module)
            if target in above:
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({layer} -> {target})")
            if module.split(".")[0] in FORBIDDEN_LIBRARIES.get(layer, ()):
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {module} (no {module.split('.')[0]} "
                                f"in {layer})")
            if module.split(".")[0] == "pipelines":
                problems.append(f"{path.relative_to(ROOT)}:{line} imports the entry modules ({module})")
    assert not problems, "\n".join(problems)


def test_entry_modules_are_thin():
    """The top-level `pipelines/` only hands `python -m pipelines.NAME` to the console script."""
    for path in sorted((ROOT / "pipelines").glob("*.py")):
        modules = {module for _, module in _imports(path)}
        assert modules <= {"sys", "clusmar_beam.app.cli", "clusmar_beam.app.cli.main"}, (path.name, modules)


def test_the_check_sees_a_violation(tmp_path):
    """The import reader finds function-level imports too (a check that cannot fail is no check)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from clusmar_beam.app import cli\n    import apache_beam as beam\n")
    assert [_layer_of(m) for _, m in _imports(module)] == ["app", "app", None]
    assert any(m == "apache_beam" for _, m in _imports(module))
