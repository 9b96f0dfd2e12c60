"""Where things live (issue 14): storage stores charges and never imports ``dp_accounting``;
the admission arithmetic lives in ``accountant``, which imports nothing of ours; the storage
modules form no import cycle and never reach back into the ``proxy.store`` facade. A static
check of the import statements of each source file."""

from __future__ import annotations

import ast
from pathlib import Path

import accountant
import proxy.store

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_proxy_never_imports_dp_accounting() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m for m in imports(p) if m.split(".")[0] == "dp_accounting"
        )
        for p in sources("proxy")
    }
    assert {p: m for p, m in offenders.items() if m} == {}


def test_accountant_imports_nothing_of_ours() -> None:
    ours = ("proxy", "dp_decoding", "prompts", "bench")
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in imports(p) if m.split(".")[0] in ours)
        for p in sources("accountant")
    }
    assert {p: m for p, m in offenders.items() if m} == {}


def test_storage_modules_form_no_cycle_and_skip_the_facade() -> None:
    modules = {
        "proxy.storage." + p.stem: p for p in sources("proxy/storage") if p.stem != "__init__"
    }
    graph = {
        name: {m for m in imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    for name, path in modules.items():
        assert "proxy.store" not in imports(path), name

    visiting: set[str] = set()
    done: set[str] = set()

    def visit(node: str, trail: tuple[str, ...]) -> None:
        assert node not in visiting, f"import cycle: {' -> '.join((*trail, node))}"
        if node in done:
            return
        visiting.add(node)
        for dep in graph[node]:
            visit(dep, (*trail, node))
        visiting.discard(node)
        done.add(node)

    for name in graph:
        visit(name, ())


def test_public_names_resolve() -> None:
    for module in (accountant, proxy.store):
        assert len(set(module.__all__)) == len(module.__all__)
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
    assert set(proxy.store.__all__) >= {
        "Store",
        "BudgetExceeded",
        "NotFound",
        "StorageError",
        "INTERRUPTED_ERROR",
        "compose_pld_epsilon",
        "default_reference_event",
    }
