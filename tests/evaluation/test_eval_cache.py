"""The evaluation cache shared by several processes: no lost cells, first result wins, claims
split the grid, dead claims are ignored, and pieces run apart merge into one report."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from evaluation import runner
from evaluation.cache import Cache, cell_key
from evaluation.runner import EvalConfig, cells_for, load_task, run_eval
from tests.fakes import tiny_eval_config


def _by(cache: Cache, cell: dict[str, Any]) -> Any:
    """The ``by`` field of the cell's cached result (which must be there)."""
    got = cache.get(cell)
    assert got is not None
    return got["by"]


def _cell(i: int) -> dict[str, Any]:
    return {"task": "t", "method": "m", "seed": i}


def _result(tag: str) -> dict[str, Any]:
    return {"accuracy": 0.5, "calibrated": 0.5, "n": 1, "demonstrations": [], "by": tag}


def _claim_as(path: Path, cell: dict[str, Any], pid: int, age: float = 0.0) -> None:
    """Write a claim as another process (``pid``) on this host would."""
    claims_path = path.with_name(path.name + ".claims")
    claims = json.loads(claims_path.read_text()) if claims_path.is_file() else {}
    claims[cell_key(cell)] = {
        "pid": pid,
        "host": socket.gethostname(),
        "since": time.time() - age,
    }
    claims_path.write_text(json.dumps(claims))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_two_views_of_one_file_lose_no_cell_and_the_first_result_wins(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    a, b = Cache(path), Cache(path)  # both read the (empty) file before either writes
    a.put(_cell(0), _result("a"))
    b.put(_cell(1), _result("b"))
    b.put(_cell(0), _result("b"))  # a result for cell 0 is already on disk: it stays
    fresh = Cache(path)
    assert len(fresh) == 2
    assert _by(fresh, _cell(0)) == "a" and _by(fresh, _cell(1)) == "b"
    a.refresh()
    assert _by(a, _cell(1)) == "b"


def test_a_live_claim_is_respected_and_a_dead_or_stale_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    cache = Cache(path)
    _claim_as(path, _cell(0), os.getppid())  # a live process other than this one
    _claim_as(path, _cell(1), _dead_pid())
    _claim_as(path, _cell(2), os.getppid(), age=7 * 3600.0)  # older than the TTL
    assert not cache.claim(_cell(0))
    assert cache.claim(_cell(1)) and cache.claim(_cell(2)) and cache.claim(_cell(3))
    assert cache.claim(_cell(3))  # re-claiming one's own claim is fine
    cache.put(_cell(3), _result("me"))
    assert not cache.claim(_cell(3))  # finished: nobody computes it again
    claims = json.loads(path.with_name("cache.json.claims").read_text())
    assert cell_key(_cell(3)) not in claims and cell_key(_cell(0)) in claims
    cache.release(_cell(1))
    claims = json.loads(path.with_name("cache.json.claims").read_text())
    assert cell_key(_cell(1)) not in claims


def test_merge_from_imports_missing_cells_and_keeps_existing_ones(tmp_path: Path) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    Cache(here / "cache.json").put(_cell(0), _result("here"))
    other = Cache(there / "cache.json")
    other.put(_cell(0), _result("there"))
    other.put(_cell(1), _result("there"))
    cache = Cache(here / "cache.json")
    assert cache.merge_from([there]) == 1
    assert _by(cache, _cell(0)) == "here" and _by(cache, _cell(1)) == "there"
    with pytest.raises(FileNotFoundError):
        cache.merge_from([tmp_path / "nowhere"])


def _cfg(shared_data: Path, out: Path, **kw: Any) -> EvalConfig:
    return tiny_eval_config(shared_data, out, seeds=2, methods=["zero-shot", "real", "best"], **kw)


def _fake_run_cell(engine: Any, cell: dict[str, Any], data: Any, cfg: Any) -> dict[str, Any]:
    time.sleep(0.05)
    res = _result(str(os.getpid()))
    if cell["method"] == "best":
        res.update(epsilon_achieved=1.0, sigma=None, epsilon0=0.1, q=None, steps=15)
    return res


def test_cells_claimed_elsewhere_are_skipped_and_reported_pending(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(shared_data, tmp_path)
    cells = cells_for(cfg, load_task(cfg, "trec").spec)
    busy = cells[:2]
    for cell in busy:
        _claim_as(tmp_path / "cache.json", cell, os.getppid())
    monkeypatch.setattr(runner, "run_cell", _fake_run_cell)
    res = run_eval(cfg, engine_factory=lambda: object())
    assert res["cells_computed_this_sitting"] == len(cells) - 2
    assert res["cells_pending"] == 2 and len(res["cells"]) == len(cells) - 2
    # the other process finishes its cells; a report-only pass then has them all
    for cell in busy:
        Cache(tmp_path / "cache.json").put(cell, _fake_run_cell(None, cell, None, None))
    res = run_eval(_cfg(shared_data, tmp_path, report_only=True), engine_factory=lambda: None)
    assert res["cells_pending"] == 0 and len(res["cells"]) == len(cells)


def _worker(cfg: EvalConfig) -> None:
    runner.run_cell = _fake_run_cell
    res = run_eval(cfg, engine_factory=lambda: object())
    (cfg.out / f"computed-{os.getpid()}.json").write_text(
        json.dumps(res["cells_computed_this_sitting"])
    )


def test_two_processes_on_one_out_split_the_grid(shared_data: Path, tmp_path: Path) -> None:
    """Two real processes run the same grid on one folder at once: every cell is computed
    exactly once between them and the cache holds the whole grid."""
    cfg = _cfg(shared_data, tmp_path)
    n = len(cells_for(cfg, load_task(cfg, "trec").spec))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(cfg,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    counts = [json.loads(f.read_text()) for f in tmp_path.glob("computed-*.json")]
    assert len(counts) == 2 and sum(counts) == n
    cache = json.loads((tmp_path / "cache.json").read_text())
    assert len(cache) == n
    assert json.loads((tmp_path / "cache.json.claims").read_text()) == {}
