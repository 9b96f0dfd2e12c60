"""The heap bound (dp_decoding/engines/heap.py) changes where memory goes, never what is drawn:
one seeded job on the real model gives bitwise the same log-probabilities and the same tokens
with glibc's default (dynamic) mmap threshold and with the bound. Each side runs in its own
process, because the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dp_decoding.engines import heap

ROOT = Path(__file__).resolve().parents[2]

# argv: "default" (the allocator as before the bound) or "bounded"; the data file.
_JOB = r"""
import hashlib, json, sys
import numpy as np
import dp_decoding.engines.embedded as embedded
from dp_decoding.generate import DemoGenerator
from dp_decoding.plan import make_plan
from dp_decoding.records import load_jsonl

engine = embedded.EmbeddedEngine(threads=1, bound_heap=sys.argv[1] == "bounded")
plan = make_plan(
    labels=["World", "Sports"], task="generic", shots=2, prompts=4, max_tokens=6,
    description="A news article headline and summary.",
)
records = load_jsonl(sys.argv[2])[:300]
tokens = []
gen = DemoGenerator(
    engine, plan, plan.prompt_task(), rng=np.random.default_rng(15),
    job_key=b"heap-equivalence-key-0123456789a",
)
emit = gen._emit
gen._emit = lambda g, tok: (tokens.append(int(tok)), emit(g, tok))[1]
demos = gen.run(records)
row = engine.tokenize("News: the central bank raised rates on Tuesday")
batch = engine.start([row] * 3, width=len(row) + 4)
digest = hashlib.sha256(batch.logprobs().tobytes()).hexdigest()
print(json.dumps({"bounded": engine.heap_bounded, "tokens": tokens,
                  "demos": [d.to_dict() for d in demos], "logprobs": digest}))
"""


def _run(side: str, data: Path) -> dict[str, object]:
    r = subprocess.run(
        [sys.executable, "-c", _JOB, side, str(data)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.model
def test_the_heap_bound_leaves_a_seeded_job_unchanged(shared_data: Path) -> None:
    data = shared_data / "agnews" / "train.jsonl"
    before, after = _run("default", data), _run("bounded", data)
    assert before["bounded"] is False
    assert after["bounded"] is (sys.platform.startswith("linux"))
    assert before["tokens"] and before["tokens"] == after["tokens"]
    assert before["demos"] == after["demos"]
    assert before["logprobs"] == after["logprobs"]


def test_a_user_threshold_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert heap.bound_heap_retention() is False


def test_the_bound_is_set_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    # in a child: the setting is process-wide, and this test session must keep glibc's default
    code = "from dp_decoding.engines import heap; print(heap.bound_heap_retention())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-1000:]
