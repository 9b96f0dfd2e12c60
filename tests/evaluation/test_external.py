"""External demonstrations (the peer ``invink``, issue 18): a demos file's demonstrations are
scored through the same path as dpicl's own; the file is checked; the peer is a
benchmark-only dependency that nothing of the product (or the evaluation) imports."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from evaluation.external import FORMAT, digest, load_demos_file
from evaluation.runner import cells_for, load_task, run_eval
from evaluation.scoring import score
from prompts import clean_demonstration
from tests.evaluation.test_eval_layout import ROOT, all_imports
from tests.fakes import tiny_eval_config

PRODUCT = ("proxy", "dp_decoding", "accountant", "prompts")


def demos_file(path: Path, labels: tuple[str, ...], **over: Any) -> Path:
    """A TREC demos file: ε = 1, seed 0, four demonstrations (one quoted, to be cleaned)."""
    demos = [[f'"what is example {i}?"\nsecond line', labels[i % len(labels)]] for i in range(4)]
    doc = {
        "format": FORMAT,
        "method": "invink",
        "source": "invink==0.1.0",
        "task": "trec",
        "shots": 4,
        "cells": [{"epsilon": "1", "seed": 0, "demonstrations": demos, "info": {"T": 15}}],
    }
    doc.update(over)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_external_cells_are_the_files_cells_keyed_by_their_texts(
    shared_data: Path, tmp_path: Path
) -> None:
    cfg = tiny_eval_config(shared_data, tmp_path, methods=["invink"])
    labels = load_task(cfg, "trec").spec.demo_labels
    cfg.demos_file = demos_file(tmp_path / "d.json", labels)
    cells = cells_for(cfg, load_task(cfg, "trec").spec)
    # ε ∈ {1, ∞} in the grid, only ε = 1 in the file: one cell
    assert [(c["method"], c["epsilon"], c["seed"]) for c in cells] == [("invink", "1", 0)]
    ext = load_demos_file(cfg.demos_file, labels)
    assert cells[0]["demos_sha256"] == digest(ext.cells[0].demonstrations)
    assert ext.cells[0].demonstrations[0][0] == clean_demonstration('"what is example 0?"\nx')
    # other texts, another cell (a score is never reused for other demonstrations)
    other = tiny_eval_config(shared_data, tmp_path, methods=["invink"])
    doc = json.loads(cfg.demos_file.read_text())
    doc["cells"][0]["demonstrations"][0][0] = "another text"
    other.demos_file = tmp_path / "e.json"
    other.demos_file.write_text(json.dumps(doc))
    assert (
        cells_for(other, load_task(other, "trec").spec)[0]["demos_sha256"]
        != cells[0]["demos_sha256"]
    )
    # without a file (or without the method) there is no external cell
    spec = load_task(cfg, "trec").spec
    assert cells_for(tiny_eval_config(shared_data, tmp_path, methods=["invink"]), spec) == []
    with_file_without_row = tiny_eval_config(shared_data, tmp_path, methods=["real"])
    with_file_without_row.demos_file = cfg.demos_file
    assert {c["method"] for c in cells_for(with_file_without_row, spec)} == {"real"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "not a demos file"),
        ({"shots": 3}, "4 demonstrations, the file declares 3"),
        ({"cells": [{"epsilon": "1", "seed": 0, "demonstrations": [["x", "NOPE"]] * 4}]}, "label"),
        ({"cells": [{"epsilon": "0", "seed": 0, "demonstrations": []}]}, "epsilon must be > 0"),
        ({"cells": [{"seed": 0, "demonstrations": []}]}, "malformed"),
    ],
)
def test_a_malformed_demos_file_is_refused(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    labels = ("DESC", "ENTY", "HUM", "NUM")
    path = demos_file(tmp_path / "d.json", labels, **change)
    with pytest.raises(ValueError, match=message):
        load_demos_file(path, labels)


def test_cli_refuses_invink_without_a_demos_file(tmp_path: Path) -> None:
    from evaluation.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--methods", "invink", "--out", str(tmp_path)])
    assert args.func(args) == 2


@pytest.mark.model
def test_external_demonstrations_are_scored_exactly_like_ours(
    engine: Any, shared_data: Path, tmp_path: Path
) -> None:
    """The external cell's score is :func:`score` on the cleaned file demonstrations and the
    run's test rows — the call every other row makes — and it shows in the report."""
    cfg = tiny_eval_config(shared_data, tmp_path, methods=["invink"])
    cfg.epsilons = [1.0]
    data = load_task(cfg, "trec")
    cfg.demos_file = demos_file(tmp_path / "d.json", data.spec.demo_labels)
    res = run_eval(cfg, engine_factory=lambda: engine)
    (cell,) = res["cells"]
    want = list(load_demos_file(cfg.demos_file).cells[0].demonstrations)
    assert [tuple(d) for d in cell["result"]["demonstrations"]] == want
    direct = score(engine, data.fmt, want, data.test)
    assert cell["result"]["hits"] == direct.hits
    assert cell["result"]["hits_calibrated"] == direct.hits_calibrated
    assert cell["result"]["steps"] == 15
    assert "invink" in (tmp_path / "results.md").read_text()


def test_the_product_never_imports_the_peer() -> None:
    """invink is a benchmark-only dependency: no module of the product or the evaluation
    imports it (AST) or names it at all (no ``import_module("invink")`` either)."""
    offenders = {}
    for package in (*PRODUCT, "evaluation"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            bad = {m for m in all_imports(path) if m.split(".")[0] == "invink"}
            if bad or (package in PRODUCT and re.search(r"\binvink\b", text)):
                offenders[str(path.relative_to(ROOT))] = sorted(bad) or ["mentions invink"]
    assert offenders == {}


def test_make_test_and_serve_never_install_the_peer() -> None:
    """The peer is not a dependency of the core nor of an extra that `make test` / `make serve`
    install; it has its own venv target."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any("invink" in d for d in project["dependencies"])
    for extra in ("dev", "eval", "vllm-cpu"):
        assert not any("invink" in d for d in project["optional-dependencies"].get(extra, []))
    make = (ROOT / "Makefile").read_text()
    peer_lines = [line for line in make.splitlines() if "invink" in line and "pip" in line]
    assert peer_lines and all("PEER_VENV" in line for line in peer_lines)
