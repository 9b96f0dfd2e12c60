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
        cwd=Path(__file__).resolve().parents[1],
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


def test_missing_file(tmp_path: Path) -> None:
    _assert_clean_error(dpicl("generate", "--data", str(tmp_path / "nope.jsonl")), "not found")


def test_malformed_line_names_line_number_not_content(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": SECRET, "label": "A"}) + "\n" + "{" + SECRET + "\n")
    _assert_clean_error(dpicl("generate", "--data", str(p)), "line 2")


def test_missing_field(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": SECRET}) + "\n")
    _assert_clean_error(dpicl("plan", "--data", str(p)), "line 1")


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
        (["--public-prior", "1"], "public-prior"),  # needs the exponential mechanism
        (["--mechanism", "exponential", "--public-prior", "-1"], "public-prior"),
    ],
)
def test_bad_plan_parameters(good: Path, args: list[str], needle: str) -> None:
    _assert_clean_error(dpicl("generate", "--data", str(good), *args), needle)


def test_plan_with_public_prior(good: Path) -> None:
    r = dpicl("plan", "--data", str(good), "--mechanism", "exponential", "--public-prior", "1")
    assert r.returncode == 0, r.stderr
    assert "public_prior" in r.stdout and SECRET not in r.stdout


def test_extraction_task_is_refused_cleanly(good: Path) -> None:
    _assert_clean_error(dpicl("generate", "--data", str(good), "--task", "mit-g"), "dpicl eval")


def test_plan_prints_defaults_and_guarantee(good: Path) -> None:
    r = dpicl("plan", "--data", str(good))
    assert r.returncode == 0, r.stderr
    for word in ("regime", "mechanism", "sigma", "epsilon", "guarantee", "taken as public"):
        assert word in r.stdout
    assert SECRET not in r.stdout


def test_plan_without_data_needs_labels() -> None:
    r = dpicl("plan")
    _assert_clean_error(r, "--labels")
    assert dpicl("plan", "--labels", "a,b").returncode == 0


def test_help_explains() -> None:
    r = dpicl("generate", "--help")
    assert r.returncode == 0 and "--epsilon" in r.stdout and "--regime" in r.stdout
