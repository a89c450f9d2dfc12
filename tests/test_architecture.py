"""docs/ARCHITECTURE.md's module table is the import rule: every module of the package is listed, and each
imports (at the top or lazily inside a function) only modules of a lower layer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each package's files live (pyproject's package-dir).
PACKAGES = {"synthgen": "engine", "synthgen.kernels": "kernels", "synthgen.export": "export"}
ROW = re.compile(r"^\| `([\w.]+)` \| (\d+) \| .+ \|$")


def documented_layers() -> dict[str, int]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    return {m.group(1): int(m.group(2)) for m in map(ROW.match, text.splitlines()) if m}


def package_modules() -> dict[str, Path]:
    """Module name relative to synthgen ("render", "kernels.dispatch"; "synthgen" for the root) -> file."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            name = ".".join([package, *parts])
            out[name.removeprefix("synthgen.") if name != "synthgen" else name] = path
    return out


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The synthgen modules a file imports, as table names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "synthgen":
            base = node.module.removeprefix("synthgen").lstrip(".") or "synthgen"
            for alias in node.names:
                sub = alias.name if base == "synthgen" else f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "synthgen":
                    found.add(alias.name.removeprefix("synthgen.") if alias.name != "synthgen" else "synthgen")
    return found


def test_every_module_is_in_the_table_and_every_row_is_a_module():
    layers, modules = documented_layers(), package_modules()
    assert len(layers) > 40, "the module table of docs/ARCHITECTURE.md was not found"
    assert sorted(set(modules) - set(layers)) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(set(layers) - set(modules)) == [], "rows of docs/ARCHITECTURE.md that name no module"


def test_imports_only_go_to_lower_layers():
    layers, modules = documented_layers(), package_modules()
    wrong = []
    for name, path in modules.items():
        if name not in layers:
            continue  # reported by the test above
        for dep in sorted(imported_modules(path, set(modules)) - {name}):
            if dep in layers and layers[dep] >= layers[name]:
                wrong.append(f"{name} (layer {layers[name]}) imports {dep} (layer {layers[dep]})")
    assert wrong == []


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from synthgen.pipeline import run_generate\n    import synthgen.render\n")
    assert imported_modules(source, {"pipeline", "render"}) == {"pipeline", "render"}
