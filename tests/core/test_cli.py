"""The CLI: bad input gets one clear line and exit code 2, never a traceback, never private
text; ``plan`` prints the declared parameters and the guarantee."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "ZEBRA-PRIVATE-7731"


def dpicl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


@pytest.fixture
def good(tmp_path: Path) -> Path:
    p = tmp_path / "good.jsonl"
    p.write_text(
        "\n".join(json.dumps({"text": f"{SECRET} {i}", "label": "AB"[i % 2]}) for i in range(10))
        + "\n"
    )
    return p


def _assert_clean_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert SECRET not in r.stderr and SECRET not in r.stdout
    assert needle in r.stderr


LABELS = ("--labels", "A,B")


def test_missing_file(tmp_path: Path) -> None:
    _assert_clean_error(
        dpicl("generate", "--data", str(tmp_path / "nope.jsonl"), *LABELS), "not found"
    )


def test_malformed_line_names_line_number_not_content(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": SECRET, "label": "A"}) + "\n" + "{" + SECRET + "\n")
    _assert_clean_error(dpicl("generate", "--data", str(p), *LABELS), "line 2")


def test_missing_field(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": SECRET}) + "\n")
    _assert_clean_error(dpicl("plan", "--data", str(p), *LABELS), "line 1")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--epsilon", "0"], "epsilon"),
        (["--epsilon", "-2"], "epsilon"),
        (["--delta", "1.5"], "delta"),
        (["--delta", "0"], "delta"),
        (["--regime", "resampled"], "--q"),
        (["--q", "0.1"], "resampled regime only"),
        (["--prompts", "0"], "prompts"),
        (["--mechanism", "gaussian", "--public-prior", "1"], "public-prior"),  # exponential only
        (["--mechanism", "exponential", "--public-prior", "-1"], "public-prior"),
    ],
)
def test_bad_plan_parameters(good: Path, args: list[str], needle: str) -> None:
    _assert_clean_error(dpicl("generate", "--data", str(good), *LABELS, *args), needle)


def test_plan_with_public_prior(good: Path) -> None:
    r = dpicl(
        "plan", "--data", str(good), *LABELS, "--mechanism", "exponential", "--public-prior", "1"
    )
    assert r.returncode == 0, r.stderr
    assert "public_prior" in r.stdout and SECRET not in r.stdout


def test_extraction_task_is_refused_cleanly(good: Path) -> None:
    _assert_clean_error(dpicl("generate", "--data", str(good), "--task", "mit-g"), "dpicl eval")


def test_plan_prints_defaults_and_guarantee(good: Path) -> None:
    r = dpicl("plan", "--data", str(good), *LABELS)
    assert r.returncode == 0, r.stderr
    for word in ("regime", "mechanism", "epsilon0", "epsilon", "guarantee", "['A', 'B']"):
        assert word in r.stdout
    assert "taken as public" not in r.stdout and "read from the data" not in r.stdout
    assert SECRET not in r.stdout


def test_plan_without_data_needs_labels() -> None:
    r = dpicl("plan")
    _assert_clean_error(r, "--labels")
    assert dpicl("plan", "--labels", "a,b").returncode == 0


@pytest.mark.parametrize("command", ["plan", "generate"])
def test_generic_task_never_takes_the_label_set_from_the_data(good: Path, command: str) -> None:
    """With data but no --labels, a generic task is refused (exit 2) before any record is
    read: the label set is a privacy parameter, and a label seen only in the data would be
    released with certainty. The message says how to declare it and how to see the file's."""
    r = dpicl(command, "--data", str(good))
    _assert_clean_error(r, "--labels A,B,...")
    assert "dpicl labels --data FILE" in r.stderr
    assert r.stdout == ""


def test_plan_drops_undeclared_labels_from_the_curator_hints(good: Path) -> None:
    r = dpicl("plan", "--data", str(good), "--labels", "A")
    assert r.returncode == 0, r.stderr
    assert "  A: 5 records" in r.stdout and "  B:" not in r.stdout


def test_labels_command_prints_the_curators_own_counts(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    rows = [{"text": f"{SECRET} {i}", "cls": "xyz"[i % 3] if i < 7 else "x"} for i in range(9)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = dpicl("labels", "--data", str(p), "--label-field", "cls")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["x\t5", "y\t2", "z\t2"]
    assert "curator" in r.stderr and "--labels" in r.stderr
    assert SECRET not in r.stdout + r.stderr
    h = dpicl("labels", "--help")
    assert h.returncode == 0 and "for the data's owner only" in " ".join(h.stdout.split())
    _assert_clean_error(dpicl("labels", "--data", str(tmp_path / "nope.jsonl")), "not found")


def test_generate_output_holds_no_run_dependent_count(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """demos.json is released: it carries the plan and engine facts fixed by the plan, but not
    how many groups the step loop finished (that depends on the run); the curator reads that
    count on stderr."""
    import dp_decoding.engines
    from proxy.cli import build_parser
    from tests.fakes import FakeEngine

    monkeypatch.setattr(dp_decoding.engines, "load_engine", lambda name: FakeEngine())
    out = tmp_path / "demos.json"
    args = build_parser().parse_args(
        ["generate", "--data", str(good), *LABELS, "--prompts", "2", "--max-tokens", "3"]
        + ["--engine", "fake", "--out", str(out), "--quiet"]
    )
    assert args.func(args) == 0
    released = json.loads(out.read_text())
    assert "groups_finished_by_step_loop" not in released["engine"]
    assert released["engine"]["in_engine_aggregation"] is False
    assert "fallback" not in out.read_text() and SECRET not in out.read_text()
    assert [d["label"] for d in released["demonstrations"]] == ["A", "B"]
    err = capsys.readouterr().err
    assert "curator only, not released): 0 groups finished by the step loop" in err


def test_help_explains() -> None:
    r = dpicl("generate", "--help")
    assert r.returncode == 0 and "--epsilon" in r.stdout and "--regime" in r.stdout


@pytest.mark.parametrize("command", ["plan", "generate"])
def test_plan_over_the_engine_context_exits_2_before_reading_data(good: Path, command: str) -> None:
    """The declared worst-case row (width + T) is checked against the engine's context before
    any record is read or any engine loaded: whether a job fails never depends on the data."""
    r = dpicl(command, "--data", str(good), *LABELS, "--epsilon", "4", "-N", "90")
    _assert_clean_error(r, "over the engine's context")
    assert "examples-per-prompt" in r.stderr and "loading engine" not in r.stderr


def test_released_fields_do_not_change_between_neighbouring_datasets(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every field of demos.json but the demonstrations' texts (the mechanism's output) is the
    same for two neighbouring datasets (one record added) that both succeed."""
    import dp_decoding.engines
    from proxy.cli import build_parser
    from tests.fakes import FakeEngine

    monkeypatch.setattr(dp_decoding.engines, "load_engine", lambda name: FakeEngine())
    neighbour = tmp_path / "neighbour.jsonl"
    extra = json.dumps({"text": f"{SECRET} a much longer extra record " * 8, "label": "A"})
    neighbour.write_text(good.read_text() + extra + "\n")
    released = []
    for data in (good, neighbour):
        out = tmp_path / f"{data.stem}.json"
        args = build_parser().parse_args(
            ["generate", "--data", str(data), *LABELS, "--prompts", "2", "--max-tokens", "3"]
            + ["--engine", "fake", "--out", str(out), "--quiet"]
        )
        assert args.func(args) == 0
        released.append(json.loads(out.read_text()))
    a, b = released
    assert set(a) == set(b)
    for field in a:
        if field == "demonstrations":
            assert [d["label"] for d in a[field]] == [d["label"] for d in b[field]]
            assert all(set(x) == set(y) for x, y in zip(a[field], b[field], strict=True))
        else:
            assert a[field] == b[field], field
