"""Where evaluation and the dev tooling live (issue 14): ``evaluation`` and ``devtools`` are
top-level packages outside the core; the core never imports them (``proxy/cli.py`` alone
registers ``dpicl eval`` / ``dpicl audit``); ``evaluation``'s modules form no import cycle;
building the ``dpicl`` parser (what ``dpicl serve`` does first) never loads matplotlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ("dp_decoding", "proxy", "accountant", "prompts")


def top_level_imports(path: Path) -> set[str]:
    """Absolute module names imported at module level (not inside functions) by ``path``."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def all_imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (function bodies included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def test_the_core_never_imports_evaluation_or_devtools() -> None:
    offenders = {}
    for package in CORE:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            banned = {"devtools"} if rel == "proxy/cli.py" else {"devtools", "evaluation"}
            bad = sorted(m for m in all_imports(path) if m.split(".")[0] in banned)
            if bad:
                offenders[rel] = bad
    assert offenders == {}
    assert not (ROOT / "dp_decoding" / "evaluation").exists()


def test_evaluation_and_devtools_import_nothing_of_the_benchmarks_or_tests() -> None:
    for package in ("evaluation", "devtools"):
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = {m for m in all_imports(path) if m.split(".")[0] in ("tests", "bench")}
            assert not bad, (path, bad)


def test_evaluation_modules_form_no_import_cycle() -> None:
    modules = {
        "evaluation." + p.stem: p
        for p in (ROOT / "evaluation").glob("*.py")
        if p.stem != "__init__"
    }
    graph = {
        name: {m for m in top_level_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    done: set[str] = set()

    def visit(node: str, trail: tuple[str, ...]) -> None:
        assert node not in trail, f"import cycle: {' -> '.join((*trail, node))}"
        if node in done:
            return
        for nxt in graph[node]:
            visit(nxt, (*trail, node))
        done.add(node)

    for name in graph:
        visit(name, ())


def test_building_the_cli_never_imports_matplotlib() -> None:
    code = (
        "import sys\n"
        "from proxy.cli import build_parser\n"
        "build_parser()\n"
        "import evaluation.runner, evaluation.report, evaluation.audit\n"
        "print('matplotlib' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"
