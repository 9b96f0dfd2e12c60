"""Private rows at a declared width (dp_decoding/rows.py) and the context check before admission.

Property: whatever the records, a private row is at most ``RowBuilder.width(N)`` tokens, on the
shipped model's real tokenizer; for texts under the limit the token-level row is exactly the
text-level prompt; a plan whose declared worst case exceeds the engine's context is refused
before admission (API 400 ``invalid_plan``, no charge)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_decoding.plan import PlanError, make_plan
from dp_decoding.rows import RowBuilder, check_context
from prompts import generation_prompt, get_task
from proxy.app import create_app
from proxy.store import Store
from tests.fakes import FakeEngine


@pytest.fixture(scope="module")
def tokenize():
    from transformers import AutoTokenizer

    from dp_decoding.engines.model_files import ensure_model_dir

    tok = AutoTokenizer.from_pretrained(str(ensure_model_dir()))
    return lambda t: list(tok.encode(t, add_special_tokens=False))


TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=600
).filter(lambda t: t.strip() != "")


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(TEXT, min_size=0, max_size=4), n=st.integers(1, 4))
def test_private_rows_never_exceed_the_declared_width(tokenize, texts: list[str], n: int) -> None:
    task = get_task("agnews")
    b = RowBuilder(tokenize, task, task.labels, 24)
    for label in task.labels:
        assert len(b.private_row(label, texts[:n])) <= b.width(n)


@settings(max_examples=30, deadline=None)
@given(pairs=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3))
def test_extraction_rows_cut_the_private_span_too(tokenize, pairs: list[tuple[str, str]]) -> None:
    task = get_task("mit-g")
    b = RowBuilder(tokenize, task, ["comedy"], 16)
    assert len(b.private_row("comedy", pairs)) <= b.width(len(pairs))


def test_short_texts_give_the_text_level_prompt(tokenize) -> None:
    task = get_task("agnews")
    texts = ["Stocks rose on Monday.", "The team won again, 3-1."]
    b = RowBuilder(tokenize, task, task.labels, 96)
    assert b.private_row("World", texts) == tokenize(generation_prompt(task, "World", texts))
    assert b.public_row("World") == tokenize(generation_prompt(task, "World", []))


def test_context_check(tokenize) -> None:
    plan = make_plan(labels=["World"], epsilon=4.0, examples_per_prompt=8, task="agnews")
    need = check_context(plan, get_task("agnews"), tokenize, 8192)
    assert (
        need == RowBuilder(tokenize, get_task("agnews"), ["World"], 96).width(8) + plan.max_tokens
    )
    with pytest.raises(PlanError, match="examples-per-prompt"):
        check_context(plan, get_task("agnews"), tokenize, need - 1)
    assert check_context(plan, get_task("agnews"), tokenize, None) == need


class _SmallContext(FakeEngine):
    name = "fake-model"
    max_context = 200


def test_api_refuses_a_plan_over_the_context_before_admission(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'a.db'}")
    _, key = store.create_tenant("t", 8.0, 1e-6)
    app = create_app(store, _SmallContext(), run_jobs=False)
    rows = "\n".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) for i in range(6))

    async def go() -> tuple[httpx.Response, httpx.Response, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            h = {"Authorization": f"Bearer {key}"}
            ds = await c.post(
                "/v1/private/datasets",
                data={"name": "d"},
                headers=h,
                files={"file": ("d.jsonl", rows.encode())},
            )
            body = {
                "dataset": ds.json()["id"],
                "name": "n",
                "epsilon": 1.0,
                "labels": ["a", "b"],
                "examples_per_prompt": 4,
            }
            plan = await c.post("/v1/private/demonstrations/plan", headers=h, json=body)
            job = await c.post("/v1/private/demonstrations", headers=h, json=body)
            budget = (await c.get("/v1/private/budget", headers=h)).json()
            return plan, job, budget

    plan, job, budget = asyncio.run(go())
    for r in (plan, job):
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "invalid_plan" and "context" in err["message"]
    assert budget["epsilon_spent"] == 0
