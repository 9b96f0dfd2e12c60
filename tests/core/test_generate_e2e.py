"""End to end: `dpicl generate` on the real SmolLM2 model over a slice of AGNews train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model


def test_generate_one_demonstration_per_label(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "agnews" / "train.jsonl"
    data = tmp_path / "slice.jsonl"
    data.write_text("".join(src.open().readlines()[:400]))
    out = tmp_path / "demos.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy.cli",
            "generate",
            "--data",
            str(data),
            "--task",
            "agnews",
            "--epsilon",
            "8",
            "--prompts",
            "6",
            "--max-tokens",
            "12",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    labels = [d["label"] for d in doc["demonstrations"]]
    assert labels == ["World", "Sports", "Business", "Sci/Tech"]
    assert all(isinstance(d["text"], str) for d in doc["demonstrations"])
    assert doc["engine"]["engine"] == "embedded"
    assert doc["engine"]["in_engine_aggregation"] is False  # the embedded engine has no design 2
    plan = doc["plan"]
    for key in (
        "regime",
        "mechanism",
        "M",
        "N",
        "q",
        "sigma",
        "sensitivity",
        "max_tokens",
        "steps",
        "labels",
        "epsilon",
        "delta",
    ):
        assert key in plan
    assert doc["epsilon"] <= 8.0 and doc["delta"] == 1e-6
    # nothing private is echoed: no demonstration is a verbatim copy of a 12-token-long record
    private = {json.loads(line)["text"] for line in data.read_text().splitlines()}
    assert not any(d["text"] in private for d in doc["demonstrations"] if len(d["text"]) > 40)
