"""One private-prediction query end to end: a real ``dpicl serve`` (the real SmolLM2 engine, a
real SQLite ledger) and the official ``openai`` client; a retry with the same
``Idempotency-Key`` returns the stored answer and is not charged again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from devtools.server import Server, create_tenant

pytestmark = pytest.mark.model

SECRET = "WOMBAT-SECRET-2291"
LABELS = ["Business", "Sports"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("pred")
    db = f"sqlite:///{tmp / 'dpicl.db'}"
    key = create_tenant(db, "alpha", 8.0)
    srv = Server(db=db, log_path=tmp / "server.log").start()
    try:
        yield {"srv": srv, "key": key, "log": tmp / "server.log"}
    finally:
        srv.stop()


def test_one_query_with_the_openai_client(server: dict[str, Any]) -> None:
    h = {"Authorization": f"Bearer {server['key']}"}
    rows = [
        {"text": f"{SECRET} {i}: " + ("shares rose" if i % 2 else "the team won"), "label": lb}
        for i, lb in enumerate(LABELS * 10)
    ]
    with httpx.Client(base_url=server["srv"].url, headers=h, timeout=300) as c:
        body = "\n".join(json.dumps(r) for r in rows).encode()
        ds = c.post(
            "/v1/private/datasets", data={"name": "d"}, files={"file": ("d.jsonl", body)}
        ).json()
        r = c.post(
            "/v1/private/predictors",
            json={
                "dataset": ds["id"],
                "name": "news-predictor",
                "labels": LABELS,
                "epsilon": 1.0,
                "prompts": 4,
                "examples_per_prompt": 2,
                "sampling_rate": 0.4,
            },
        )
        assert r.status_code == 200, r.text
        budget_before = c.get("/v1/private/budget").json()
    client = openai.OpenAI(base_url=server["srv"].url + "/v1", api_key=server["key"])
    assert "news-predictor" in [m.id for m in client.models.list()]
    ask = dict(
        model="news-predictor",
        messages=[{"role": "user", "content": "The striker scored twice in the final."}],
        extra_headers={"Idempotency-Key": "q-1"},
    )
    first = client.chat.completions.create(**ask)  # type: ignore[call-overload]  # kwargs dict
    again = client.chat.completions.create(**ask)  # type: ignore[call-overload]  # kwargs dict
    assert first.choices[0].message.content in LABELS
    assert (
        again.id == first.id
        and again.choices[0].message.content == first.choices[0].message.content
    )
    assert first.choices[0].logprobs is None and first.usage is not None
    assert first.usage.total_tokens == 0
    with httpx.Client(base_url=server["srv"].url, headers=h, timeout=60) as c:
        charges = c.get("/v1/private/budget").json()["charges"]
    assert len(charges) == len(budget_before["charges"]) + 1
    assert SECRET not in server["log"].read_text()
