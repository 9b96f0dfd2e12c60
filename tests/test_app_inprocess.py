"""The app in-process (httpx.ASGITransport, fake engine): storage failure during admission
fails closed with 503 and generates nothing; the shapes of errors from the app itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from proxy.app import create_app
from proxy.store import StorageError, Store
from tests.fakes import FakeEngine


class _Engine(FakeEngine):
    name = "fake-model"

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize("".join(m["content"] for m in messages))


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_storage_failure_during_admission_is_503_and_nothing_runs(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'a.db'}")
    _, key = store.create_tenant("t", 8.0, 1e-6)
    engine = _Engine()
    app = create_app(store, engine, run_jobs=False)

    def broken_admit(*args: Any, **kwargs: Any) -> Any:
        raise StorageError("disk I/O error")

    async def go() -> httpx.Response:
        async with _client(app) as c:
            h = {"Authorization": f"Bearer {key}"}
            rows = "\n".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) for i in range(6))
            ds = await c.post(
                "/v1/private/datasets",
                data={"name": "d"},
                headers=h,
                files={"file": ("d.jsonl", rows.encode())},
            )
            store.admit_job = broken_admit  # type: ignore[method-assign]
            return await c.post(
                "/v1/private/demonstrations",
                headers=h,
                json={"dataset": ds.json()["id"], "name": "n", "epsilon": 1.0},
            )

    r = asyncio.run(go())
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "storage_unavailable" and "disk" not in err["message"]
    assert engine.started == []  # nothing private was read or generated
    store.close()


def test_unknown_route_and_method_are_openai_shaped(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'b.db'}")
    app = create_app(store, _Engine(), run_jobs=False)

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with _client(app) as c:
            return await c.get("/v1/nope"), await c.delete("/health")

    missing, method = asyncio.run(go())
    assert missing.status_code == 404 and set(missing.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    assert method.status_code == 405 and "error" in method.json()
    store.close()
