"""The library knows nothing about its tests: no import of a test module, no fault-injection hook."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_MODULES = {p.stem for p in (ROOT / "tests").glob("*.py")} | {
    p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_no_test_code_and_has_no_fault_hooks():
    files = sorted((ROOT / "ssl_vil").rglob("*.py"))
    assert len(files) > 50 and "faultinject" in TEST_MODULES and "trainer_harness" in TEST_MODULES
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & (TEST_MODULES | {"tests"})) for f in files}
    assert {f: m for f, m in offenders.items() if m} == {}
    hooks = [str(f.relative_to(ROOT)) for f in files if "SSL_VIL_FAULT" in f.read_text()]
    assert hooks == []
