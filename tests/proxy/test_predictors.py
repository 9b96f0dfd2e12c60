"""Private predictors in-process (fake engine, real SQLite ledger): accounting against an
independent dp_accounting composition, exactly-k-answered, neighbouring datasets, idempotent
retries, OpenAI-shaped refusals of bad bodies, tenant isolation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from fastapi.testclient import TestClient

from accountant import DEFAULT_ORDERS, JobEvent, charge_at, charge_curve
from accountant.admission import Filter
from accountant.filter import add_spent
from proxy.app import create_app
from proxy.routes import predictors as predictor_routes
from proxy.storage.admission import tenant_filter
from proxy.store import Store
from tests.fakes import FakeEngine

LABELS = ["Business", "Sports"]


class _Engine(FakeEngine):
    name = "fake-model"

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize("".join(m["content"] for m in messages))


def _rows(n: int, extra: bool = False) -> list[dict[str, str]]:
    rows = [{"text": f"private item {i}", "label": LABELS[i % 2]} for i in range(n)]
    return rows + ([{"text": "the added record", "label": "Sports"}] if extra else [])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    store = Store.open(f"sqlite:///{tmp_path / 'p.db'}")
    t, admin = store.create_tenant("alpha", 4.0, 1e-6)
    _, serving = store.create_key(t.id, "serving")
    u, other = store.create_tenant("beta", 4.0, 1e-6)
    engine = _Engine()
    app = create_app(store, engine, run_jobs=False)
    with TestClient(app) as client:
        yield {
            "store": store,
            "tenant": t,
            "admin": admin,
            "serving": serving,
            "other": other,
            "engine": engine,
            "c": client,
        }
    store.close()


def _h(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def _predictor(env: dict[str, Any], rows: list[dict[str, str]], name: str = "p", **kw: Any) -> dict:
    c = env["c"]
    ds = env["store"].create_dataset(env["tenant"].id, name + "-data", rows)
    body = {
        "dataset": ds.id,
        "name": name,
        "labels": LABELS,
        "epsilon": 0.5,
        "prompts": 4,
        "examples_per_prompt": 2,
        "example_token_limit": 16,
        "query_token_limit": 16,
        "sampling_rate": 0.5,
        **kw,
    }
    r = c.post("/v1/private/predictors", json=body, headers=_h(env["admin"]))
    assert r.status_code == 200, r.text
    return r.json()


def _ask(env: dict[str, Any], model: str, text: str = "a query", key: str | None = None, **h: str):
    return env["c"].post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}]},
        headers=_h(key or env["serving"], **h),
    )


def test_create_list_and_model_card(env: dict[str, Any]) -> None:
    p = _predictor(env, _rows(20))
    assert p["object"] == "private_predictor" and p["name"] == "p" and "secret" not in p
    assert p["event"]["regime"] == "resampled" and p["event"]["q"] == 0.5
    listed = env["c"].get("/v1/private/predictors", headers=_h(env["admin"])).json()
    assert [x["id"] for x in listed["data"]] == [p["id"]]
    models = env["c"].get("/v1/models", headers=_h(env["serving"])).json()["data"]
    assert "p" in [m["id"] for m in models]
    assert env["c"].get("/v1/models/p", headers=_h(env["serving"])).status_code == 200


def test_answer_is_one_label_and_nothing_else(env: dict[str, Any]) -> None:
    _predictor(env, _rows(20))
    r = _ask(env, "p")
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": choice["message"]["content"]}
    assert choice["message"]["content"] in LABELS and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert "private item" not in r.text
    # one engine batch of M rows, all started with one declared width
    assert len(env["engine"].started) == 1 and len(env["engine"].started[0]) == 4
    comp = env["c"].post(
        "/v1/completions", json={"model": "p", "prompt": "q"}, headers=_h(env["serving"])
    )
    assert comp.status_code == 200 and comp.json()["choices"][0]["text"] in LABELS


def test_n_queries_cost_the_composition_of_n_events(env: dict[str, Any]) -> None:
    p = _predictor(env, _rows(20))
    n = 5
    for i in range(n):
        assert _ask(env, "p", f"query {i}").status_code == 200
    store, tid = env["store"], env["tenant"].id
    rows = store.ledger_rows(tid)
    assert len(rows) == n and all(r["event"] == p["event"] for r in rows)
    # independently: dp_accounting's RDP accountant on n self-composed subsampled Gaussians
    nm = p["plan"]["sigma"] / math.sqrt(2.0)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(nm)), n
    )
    acc = dp_accounting.rdp.RdpAccountant(list(DEFAULT_ORDERS))
    acc.compose(event)
    report = store.budget(tid)
    assert report is not None
    assert report["epsilon_spent"] == pytest.approx(acc.get_epsilon(1e-6), rel=1e-6)
    order = report["filter"]["order"]
    one = dp_accounting.rdp.RdpAccountant([order])
    one.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(nm)))
    assert report["filter"]["rdp_spent"] == pytest.approx(
        n * float(np.asarray(one.rdp)[0]), rel=1e-9
    )
    assert store.verify_ledger()["ok"]


def test_budget_for_k_queries_answers_exactly_k(env: dict[str, Any]) -> None:
    p = _predictor(env, _rows(20), epsilon=2.0, sampling_rate=1.0)
    store, tid = env["store"], env["tenant"].id
    with store.db.transaction() as tx:
        row = tx.execute("SELECT * FROM tenants WHERE id = ?", (tid,)).one()
    f = tenant_filter(row)
    curve = charge_curve(JobEvent.from_dict(p["event"]))
    k, spent = 0, 0.0
    while Filter("tenant", f.budget, spent).admits(curve):
        spent = add_spent(spent, charge_at(curve, f.order))
        k += 1
    assert 1 <= k <= 40
    codes = [_ask(env, "p", f"q{i}").status_code for i in range(k + 3)]
    assert codes == [200] * k + [429] * 3
    refused = _ask(env, "p", "one more").json()["error"]
    assert refused["code"] == "privacy_budget_exceeded" and refused["type"]
    assert len(env["engine"].started) == k  # nothing read for a refused query


def test_idempotent_retry_returns_the_stored_answer(env: dict[str, Any]) -> None:
    _predictor(env, _rows(20))
    first = _ask(env, "p", "same", **{"Idempotency-Key": "k1"})
    again = _ask(env, "p", "same", **{"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert len(env["store"].ledger_rows(env["tenant"].id)) == 1
    assert len(env["engine"].started) == 1
    other = _ask(env, "p", "a different query", **{"Idempotency-Key": "k1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_a_charged_query_is_answered_once(env: dict[str, Any]) -> None:
    """A racing or resumed computation of a charged query releases the first stored answer."""
    _predictor(env, _rows(20))
    r = _ask(env, "p", "x", **{"Idempotency-Key": "k2"})
    qid = r.json()["id"].removeprefix("chatcmpl-")
    stored = r.json()["choices"][0]["message"]["content"]
    other = LABELS[1 - LABELS.index(stored)]
    assert env["store"].predictors.store_answer(qid, other) == stored


def test_neighbouring_datasets_differ_only_in_the_label(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predictor_routes, "noise_source", lambda: np.random.default_rng(11))
    monkeypatch.setattr(predictor_routes, "slot_key", lambda: b"k" * 32)
    _predictor(env, _rows(30), name="d", sampling_rate=1.0)
    _predictor(env, _rows(30, extra=True), name="d2", sampling_rate=1.0)
    a, b = _ask(env, "d", "query"), _ask(env, "d2", "query")
    assert a.status_code == b.status_code == 200
    ja, jb = a.json(), b.json()
    for j in (ja, jb):
        j.pop("id"), j.pop("created"), j.pop("model")
        j["choices"][0]["message"].pop("content")
    assert ja == jb
    assert set(a.headers) == set(b.headers)
    one, two = env["engine"].started
    assert len(one) == len(two) and env["engine"].widths[0] == env["engine"].widths[1]
    assert sum(x != y for x, y in zip(one, two, strict=True)) <= 1  # one prompt moved


def test_bad_bodies_are_openai_shaped_and_charge_nothing(env: dict[str, Any]) -> None:
    c, h = env["c"], _h(env["admin"])
    ds = env["store"].create_dataset(env["tenant"].id, "d", _rows(4))
    bad = [
        {"dataset": ds.id, "name": "x", "epsilon": 1.0},  # no labels
        {"dataset": ds.id, "name": "x", "labels": LABELS, "epsilon": 1.0},  # poisson without q
        {"dataset": ds.id, "name": "x", "labels": ["a"], "epsilon": 1.0, "sampling_rate": 0.1},
        {"dataset": ds.id, "name": "x", "labels": LABELS, "epsilon": 1.0, "delta": 0.5},
        {"dataset": ds.id, "name": "x", "labels": LABELS, "epsilon": 1, "sampling": "nope"},
    ]
    for body in bad:
        r = c.post("/v1/private/predictors", json=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    missing = {"dataset": "nope", "name": "x", "labels": LABELS, "epsilon": 1.0}
    assert c.post("/v1/private/predictors", json=missing, headers=h).status_code == 404
    serving = c.post("/v1/private/predictors", json=missing, headers=_h(env["serving"]))
    assert serving.status_code in (401, 403)
    _predictor(env, _rows(8))
    for extra in ({"n": 2}, {"stream": True}, {"logprobs": True}):
        r = c.post(
            "/v1/chat/completions",
            json={"model": "p", "messages": [{"role": "user", "content": "q"}], **extra},
            headers=_h(env["serving"]),
        )
        assert r.status_code == 400 and r.json()["error"]["param"] in extra
    empty = c.post(
        "/v1/chat/completions",
        json={"model": "p", "messages": [{"role": "system", "content": "s"}]},
        headers=_h(env["serving"]),
    )
    assert empty.status_code == 400
    too_long = _ask(env, "p", **{"Idempotency-Key": "k" * 300})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "Idempotency-Key"
    assert env["store"].ledger_rows(env["tenant"].id) == []
    assert env["engine"].started == []


def test_tenant_isolation(env: dict[str, Any]) -> None:
    p = _predictor(env, _rows(8))
    c, other = env["c"], env["other"]
    r = _ask(env, "p", key=other)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert c.get(f"/v1/private/predictors/{p['id']}", headers=_h(other)).status_code == 404
    assert c.get("/v1/private/predictors", headers=_h(other)).json()["data"] == []
    models = c.get("/v1/models", headers=_h(other)).json()["data"]
    assert "p" not in [m["id"] for m in models]
    assert env["engine"].started == []


def test_name_taken_and_partition_sampling(env: dict[str, Any]) -> None:
    _predictor(env, _rows(8))
    ds = env["store"].create_dataset(env["tenant"].id, "again", _rows(8))
    body = {"dataset": ds.id, "name": "p", "labels": LABELS, "epsilon": 1.0, "sampling_rate": 0.5}
    r = env["c"].post("/v1/private/predictors", json=body, headers=_h(env["admin"]))
    assert r.status_code == 409
    part = _predictor(env, _rows(8), name="part", sampling="partition", sampling_rate=None)
    assert part["event"]["regime"] == "fixed" and part["event"]["q"] is None
    assert _ask(env, "part", "same").status_code == 200
    assert _ask(env, "part", "same").status_code == 200
    first, second = env["engine"].started
    assert first == second  # the same fixed partition (the stored key) for every query


def test_a_capped_key_stops_at_its_own_cap(env: dict[str, Any]) -> None:
    _predictor(env, _rows(20), epsilon=1.0, sampling_rate=1.0)
    _, capped = env["store"].create_key(env["tenant"].id, "serving", epsilon_cap=2.0)
    codes = [_ask(env, "p", f"q{i}", key=capped).status_code for i in range(12)]
    assert 200 in codes and codes[-1] == 429
    assert codes == sorted(codes)  # answered first, then refused
    refused = _ask(env, "p", "more", key=capped).json()["error"]
    assert refused["code"] == "privacy_budget_exceeded" and "key" in refused["message"]
    assert _ask(env, "p", "the tenant still has budget").status_code == 200


def test_batch_lines_to_a_predictor_are_charged_queries(env: dict[str, Any]) -> None:
    """Through the Batch API's hook: each predictor line is one charged query, a line answered
    again (a resumed batch: the same ``ref``) returns its stored answer without a new charge,
    and lines past the budget fail 429 ``privacy_budget_exceeded``, never answered unpaid."""
    from proxy.answering import CHAT_ENDPOINT, answer_line

    _predictor(env, _rows(20), epsilon=2.0, sampling_rate=1.0)
    store, tid = env["store"], env["tenant"].id
    key = store.authenticate(env["serving"])
    assert key is not None
    context = env["c"].app.state.context
    answers = [
        answer_line(
            context,
            key,
            CHAT_ENDPOINT,
            {"model": "p", "messages": [{"role": "user", "content": f"q{i}"}]},
            ref=f"batch_x:{i + 1}",
        )
        for i in range(60)
    ]
    ok = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status != 200]
    assert ok and refused and answers[: len(ok)] == ok  # exactly the first k answered
    assert {a.body["error"]["code"] for a in refused} == {"privacy_budget_exceeded"}
    assert all(a.body["choices"][0]["message"]["content"] in LABELS for a in ok)
    charges = len(store.ledger_rows(tid))
    assert charges == len(ok)
    again = answer_line(
        context,
        key,
        CHAT_ENDPOINT,
        {"model": "p", "messages": [{"role": "user", "content": "q0"}]},
        ref="batch_x:1",
    )
    assert again == answers[0] and len(store.ledger_rows(tid)) == charges


def test_a_demonstration_set_cannot_take_a_predictors_name(env: dict[str, Any]) -> None:
    """Both are model ids of the tenant: a set under a predictor's name would be shadowed, so
    admission refuses it (409, nothing charged)."""
    p = _predictor(env, _rows(20))
    store, tid = env["store"], env["tenant"].id
    r = env["c"].post(
        "/v1/private/demonstrations",
        json={
            "dataset": p["dataset"],
            "name": "p",
            "epsilon": 1.0,
            "labels": LABELS,
            "shots": 1,
            "max_tokens": 4,
            "prompts": 4,
        },
        headers=_h(env["admin"]),
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict", r.text
    assert store.ledger_rows(tid) == []
