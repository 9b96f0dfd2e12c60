"""The proxy end to end: a real uvicorn server on a loopback port, the real SmolLM2 engine, a
real SQLite ledger, and the official `openai` client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from devtools.server import Server, create_tenant

pytestmark = pytest.mark.model

SECRET = "QUOKKA-SECRET-5517"
BASE = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("srv")
    db = f"sqlite:///{tmp / 'dpicl.db'}"
    keys = {
        "a": create_tenant(db, "alpha", 20.0),
        "b": create_tenant(db, "beta", 20.0),
        "poor": create_tenant(db, "poor", 1.0),
    }
    srv = Server(db=db, log_path=tmp / "server.log", log_level="debug").start()
    try:
        yield {"srv": srv, "keys": keys, "tmp": tmp}
    finally:
        srv.stop()


def client(server: dict[str, Any], who: str = "a", **kw: Any) -> openai.OpenAI:
    key = server["keys"].get(who, who)
    return openai.OpenAI(base_url=server["srv"].url + "/v1", api_key=key, **kw)


def raw(server: dict[str, Any], who: str = "a") -> httpx.Client:
    key = server["keys"].get(who, who)
    return httpx.Client(
        base_url=server["srv"].url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def upload(server: dict[str, Any], who: str, name: str, rows: list[dict[str, Any]]) -> dict:
    body = "\n".join(json.dumps(r) for r in rows).encode()
    r = raw(server, who).post(
        "/v1/private/datasets",
        data={"name": name},
        files={"file": ("d.jsonl", body, "application/jsonl")},
    )
    assert r.status_code == 200, r.text
    return r.json()


def private_rows(n: int = 40) -> list[dict[str, str]]:
    return [
        {
            "text": f"{SECRET} item {i}: stocks rallied on strong earnings",
            "label": "Business" if i % 2 else "Sports",
        }
        for i in range(n)
    ]


def wait_job(server: dict[str, Any], who: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    with raw(server, who) as c:
        while time.monotonic() < deadline:
            job = c.get(f"/v1/private/demonstrations/{job_id}").json()
            if job["status"] in ("succeeded", "failed"):
                return job
            time.sleep(0.5)
    raise AssertionError("job did not finish")


SMALL_EPSILON = 4.0
SMALL_JOB = {
    "epsilon": SMALL_EPSILON,
    "shots": 1,
    "max_tokens": 6,
    "prompts": 4,
    "labels": ["Business", "Sports"],
}


@pytest.fixture(scope="module")
def demo_set(server: dict[str, Any]) -> dict[str, Any]:
    ds = upload(server, "a", "tickets", private_rows())
    r = raw(server, "a").post(
        "/v1/private/demonstrations", json={"dataset": ds["id"], "name": "alpha-demos", **SMALL_JOB}
    )
    assert r.status_code == 200, r.text
    job = wait_job(server, "a", r.json()["id"])
    assert job["status"] == "succeeded", job
    return {"dataset": ds, "job": job}


def test_models_list(server: dict[str, Any]) -> None:
    ids = [m.id for m in client(server).models.list()]
    assert BASE in ids


def test_chat_plain(server: dict[str, Any]) -> None:
    r = client(server).chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert r.object == "chat.completion"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 8
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_streaming_with_usage(server: dict[str, Any]) -> None:
    stream = client(server).chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    plain = client(server).chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=10,
        temperature=0,
    )
    assert text == plain.choices[0].message.content


def test_completions_plain_stream_and_logprobs(server: dict[str, Any]) -> None:
    c = client(server)
    r = c.completions.create(
        model=BASE, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert r.object == "text_completion" and lp is not None and lp.tokens is not None
    assert r.usage is not None and len(lp.tokens) == r.usage.completion_tokens
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=BASE, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        )
        if ch.choices
    )
    assert streamed == r.choices[0].text
    two = c.completions.create(model=BASE, prompt="Once", max_tokens=4, n=2, seed=1)
    assert len(two.choices) == 2


def test_stop_sequences(server: dict[str, Any]) -> None:
    r = client(server).completions.create(
        model=BASE, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[","]
    )
    assert "," not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_demo_set_is_a_model_and_answers(server: dict[str, Any], demo_set: dict) -> None:
    job = demo_set["job"]
    assert [d["label"] for d in job["demonstrations"]] == ["Business", "Sports"]
    assert job["plan"]["labels_source"] == "declared"
    assert job["plan"]["labels"] == ["Business", "Sports"]
    ids = [m.id for m in client(server).models.list()]
    assert "alpha-demos" in ids
    r = client(server).chat.completions.create(
        model="alpha-demos",
        messages=[{"role": "user", "content": "Classify: the team won."}],
        max_tokens=4,
        temperature=0,
    )
    assert isinstance(r.choices[0].message.content, str)
    r2 = client(server).completions.create(
        model="alpha-demos", prompt="Input: hi\nAnswer:", max_tokens=3, temperature=0
    )
    assert r2.choices[0].text is not None
    # no private text in the released set or its metadata
    assert SECRET not in json.dumps(job)


def test_budget_fields(server: dict[str, Any], demo_set: dict) -> None:
    b = raw(server, "a").get("/v1/private/budget").json()
    for k in (
        "epsilon_limit",
        "delta",
        "epsilon_spent",
        "epsilon_spent_pld",
        "epsilon_spent_naive",
        "largest_admissible_epsilon",
        "charges",
    ):
        assert k in b
    assert b["epsilon_limit"] == 20.0 and len(b["charges"]) >= 1
    assert 0 < b["epsilon_spent_pld"] <= b["epsilon_spent"] + 1e-9
    # the job's achieved ε (calibrated never above its declared 4.0) is in the naive sum
    achieved = demo_set["job"]["epsilon"]
    assert 0 < achieved <= SMALL_EPSILON + 1e-9
    assert b["epsilon_spent_naive"] >= achieved - 1e-9


def test_over_budget_raises_rate_limit_error_without_retry(server: dict[str, Any]) -> None:
    ds = upload(server, "poor", "p", private_rows(10))
    before = _route_count(server, "/v1/private/demonstrations")
    c = client(server, "poor", max_retries=3)
    with pytest.raises(openai.RateLimitError) as info:
        c.post(
            "/private/demonstrations",
            cast_to=object,
            body={"dataset": ds["id"], "name": "too-big", **SMALL_JOB, "epsilon": 50.0},
        )
    err = info.value
    assert err.status_code == 429
    assert err.response.headers["x-should-retry"] == "false"
    assert isinstance(err.body, dict) and err.body["type"] == "privacy_budget_exceeded"
    assert "requested" in err.body["message"]
    assert _route_count(server, "/v1/private/demonstrations") == before + 1


def _route_count(server: dict[str, Any], route: str) -> float:
    text = httpx.get(
        server["srv"].url + "/metrics", headers={"Authorization": "Bearer metrics-secret"}
    ).text
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("dpicl_requests_total{")
            and f'route="{route}"' in line
            and 'method="POST"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize(
    "kwargs",
    [
        {"messages": []},
        {"messages": [{"role": "user", "content": "x"}], "temperature": 5},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
    ],
)
def test_bad_bodies_get_400(server: dict[str, Any], kwargs: dict) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model=BASE, **kwargs)
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict)
    assert set(info.value.body) >= {"message", "type", "param", "code"}


def test_malformed_json_and_unknown_model(server: dict[str, Any]) -> None:
    with raw(server) as c:
        r = c.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )


def test_bad_key_is_401(server: dict[str, Any]) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(server, "dpicl-wrong").models.list()
    assert httpx.get(server["srv"].url + "/v1/models").status_code == 401


def test_serving_key_cannot_use_admin_routes(server: dict[str, Any]) -> None:
    r = raw(server, "a").post("/v1/private/keys", json={"scope": "serving"})
    assert r.status_code == 200
    serving_key = r.json()["key"]
    assert client(server, serving_key).models.list()  # may call models
    with raw(server, serving_key) as c:
        assert c.get("/v1/private/budget").status_code == 403
        assert c.get("/v1/private/datasets").status_code == 403
        up = c.post(
            "/v1/private/datasets",
            data={"name": "x"},
            files={"file": ("d.jsonl", b'{"text":"a","label":"b"}', "text/plain")},
        )
        assert up.status_code == 403
        job = c.post(
            "/v1/private/demonstrations", json={"dataset": "x", "name": "y", "epsilon": 1.0}
        )
        assert job.status_code == 403
        assert job.json()["error"]["type"] == "permission_error"


def test_upload_validation_names_line_not_content(server: dict[str, Any]) -> None:
    body = (json.dumps({"text": SECRET, "label": "a"}) + "\n{" + SECRET + "\n").encode()
    r = raw(server).post(
        "/v1/private/datasets",
        data={"name": "bad"},
        files={"file": ("d.jsonl", body, "text/plain")},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert "line 2" in err["message"] and SECRET not in r.text


def test_cross_tenant_isolation_every_route(server: dict[str, Any], demo_set: dict) -> None:
    ds_id, job_id = demo_set["dataset"]["id"], demo_set["job"]["id"]
    table = [
        ("GET", f"/v1/private/datasets/{ds_id}", None),
        ("DELETE", f"/v1/private/datasets/{ds_id}", None),
        ("GET", f"/v1/private/demonstrations/{job_id}", None),
        ("POST", "/v1/private/demonstrations", {"dataset": ds_id, "name": "steal", **SMALL_JOB}),
        ("POST", "/v1/private/demonstrations/plan", {"dataset": ds_id, "epsilon": 1.0}),
        ("GET", "/v1/models/alpha-demos", None),
        (
            "POST",
            "/v1/chat/completions",
            {
                "model": "alpha-demos",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "x"}],
            },
        ),
        ("POST", "/v1/completions", {"model": "alpha-demos", "prompt": "x", "max_tokens": 2}),
    ]
    with raw(server, "b") as c:
        for method, path, body in table:
            r = c.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert "alpha-demos" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert c.get("/v1/private/datasets").json()["data"] == []
    # still there for its owner
    assert raw(server, "a").get(f"/v1/private/datasets/{ds_id}").status_code == 200


def test_idempotency_key(server: dict[str, Any], demo_set: dict) -> None:
    body = {"dataset": demo_set["dataset"]["id"], "name": "idem", **SMALL_JOB}
    with raw(server, "a") as c:
        spent0 = c.get("/v1/private/budget").json()["epsilon_spent_naive"]
        r1 = c.post("/v1/private/demonstrations", json=body, headers={"Idempotency-Key": "k1"})
        r2 = c.post("/v1/private/demonstrations", json=body, headers={"Idempotency-Key": "k1"})
        assert r1.status_code == r2.status_code == 200
        assert r1.json()["id"] == r2.json()["id"]
        spent1 = c.get("/v1/private/budget").json()["epsilon_spent_naive"]
    # charged once: the naive sum grew by the job's achieved ε (≤ the declared 4.0)
    assert spent1 == pytest.approx(spent0 + r1.json()["epsilon"], rel=1e-6)
    assert r1.json()["epsilon"] <= SMALL_EPSILON + 1e-9
    wait_job(server, "a", r1.json()["id"])


def test_metrics_need_a_key_and_health_is_open(server: dict[str, Any]) -> None:
    url = server["srv"].url
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/metrics").status_code == 401
    m = httpx.get(url + "/metrics", headers={"Authorization": "Bearer metrics-secret"})
    assert m.status_code == 200 and "dpicl_requests_total" in m.text
    assert SECRET not in m.text


def test_no_private_text_in_logs(server: dict[str, Any], demo_set: dict) -> None:
    """The module's server ran a full job at log level DEBUG; its captured log must not hold
    any private record text."""
    log = Path(server["srv"].log_path).read_text()
    assert "demonstration" in log or "job" in log  # the log did capture the job
    assert SECRET not in log
