"""Limits on what a client may send (issue 17), against a real ``dpicl serve``: each oversized
input (the 30 MB chat message with and without ``Content-Length``, too many messages, too many
characters, too many tokens for the context, ``max_tokens``, ``n``, stop sequences,
log-probabilities, an oversized upload and an over-long upload line) is refused with a 400 or
413 in OpenAI's error shape that names the field and never echoes the content; afterwards a
normal request still succeeds and the server's peak memory has not grown past a small bound
(a memory bound read from /proc, not a timing)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from devtools.server import Server, create_tenant
from proxy.limits import DEFAULT_LIMITS, Limits, add_arguments, from_args

pytestmark = pytest.mark.model

BASE = "SmolLM2-135M-Instruct"
MB = 1024 * 1024
MARK = "ZEBRA-PAYLOAD-"
PEAK_GROWTH_BOUND = 160 * MB
"""How much the server's peak RSS may grow while it refuses everything below (the 30 MB
message alone grew it by gigabytes before the limits)."""


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid`` in bytes, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("limits")
    db = f"sqlite:///{tmp / 'dpicl.db'}"
    key = create_tenant(db, "alpha", 20.0)
    srv = Server(db=db, log_path=tmp / "server.log").start()
    try:
        yield {"srv": srv, "key": key}
    finally:
        srv.stop()


def http(server: dict[str, Any]) -> httpx.Client:
    return httpx.Client(
        base_url=server["srv"].url,
        headers={"Authorization": f"Bearer {server['key']}"},
        timeout=120,
    )


def chat(**kw: Any) -> dict[str, Any]:
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    body.update(kw)
    return body


def refused(r: Any, status: int, code: str | None, param: str | None) -> None:
    """``r``: an httpx response (the openai client's own httpx, too)."""
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code and err["param"] == param, err
    assert MARK not in r.text  # nothing of the content comes back


def normal_request_succeeds(server: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=server["srv"].url + "/v1", api_key=server["key"])
    out = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Say hi"}], max_tokens=2
    )
    assert out.choices[0].message.content is not None


def oversized_bodies(server: dict[str, Any]) -> None:
    """The 30 MB message: with Content-Length (the official client) and chunked."""
    client = openai.OpenAI(base_url=server["srv"].url + "/v1", api_key=server["key"], max_retries=0)
    huge = MARK + "x" * (30 * MB)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": huge}], max_tokens=2
        )
    assert caught.value.status_code == 413
    refused(caught.value.response, 413, "request_too_large", None)

    payload = json.dumps(chat(messages=[{"role": "user", "content": huge}])).encode()
    del huge

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for start in range(0, len(payload), 256 * 1024):
            yield payload[start : start + 256 * 1024]

    with http(server) as c:
        r = c.post(
            "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
    refused(r, 413, "request_too_large", None)


def oversized_fields(server: dict[str, Any]) -> None:
    limits = DEFAULT_LIMITS
    long_text = MARK + "word " * (limits.max_message_chars // 5)
    near = MARK + "a b c " * ((limits.max_message_chars - 100) // 6)  # under the char caps
    cases: list[tuple[str, dict[str, Any], int, str | None, str | None]] = [
        (
            "/v1/chat/completions",
            chat(messages=[{"role": "user", "content": "m"}] * (limits.max_messages + 1)),
            400,
            "too_many_messages",
            "messages",
        ),
        (
            "/v1/chat/completions",
            chat(messages=[{"role": "user", "content": long_text}]),
            400,
            "message_too_long",
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            chat(messages=[{"role": "user", "content": near}] * 3),
            400,
            "prompt_too_long",
            "messages",
        ),
        (
            "/v1/chat/completions",
            chat(messages=[{"role": "user", "content": near}]),
            400,
            "context_length_exceeded",
            "messages",
        ),
        ("/v1/chat/completions", chat(max_tokens=8000), 400, "limit_exceeded", "max_tokens"),
        (
            "/v1/chat/completions",
            chat(messages=[{"role": "user", "content": MARK + " hello" * 5000}], max_tokens=4096),
            400,
            "context_length_exceeded",
            "max_tokens",
        ),
        ("/v1/chat/completions", chat(n=64), 400, "limit_exceeded", "n"),
        (
            "/v1/chat/completions",
            chat(stop=["a", "b", "c", "d", "e"]),
            400,
            "limit_exceeded",
            "stop",
        ),
        ("/v1/chat/completions", chat(stop=[MARK + "s" * 1000]), 400, "limit_exceeded", "stop"),
        (
            "/v1/chat/completions",
            chat(logprobs=True, top_logprobs=50),
            400,
            "limit_exceeded",
            "top_logprobs",
        ),
        (
            "/v1/completions",
            {"model": BASE, "prompt": MARK + "p" * (limits.max_prompt_chars + 1)},
            400,
            "prompt_too_long",
            "prompt",
        ),
        (
            "/v1/completions",
            {"model": BASE, "prompt": "hi", "logprobs": 9},
            400,
            "limit_exceeded",
            "logprobs",
        ),
    ]
    with http(server) as c:
        for path, body, status, code, param in cases:
            refused(c.post(path, json=body), status, code, param)


def oversized_uploads(server: dict[str, Any]) -> None:
    limits = DEFAULT_LIMITS
    line = json.dumps({"text": MARK + "t" * (limits.max_upload_line_bytes + 10), "label": "a"})
    ok_line = json.dumps({"text": "fine", "label": "a"})
    with http(server) as c:
        r = c.post(
            "/v1/private/datasets",
            data={"name": "long-line"},
            files={"file": ("d.jsonl", (ok_line + "\n" + line).encode())},
        )
        refused(r, 400, "line_too_long", "file")
        assert "Line 2" in r.json()["error"]["message"]
        # the Batch API's /v1/files is bound by the same limits (proxy/batch_input.py)
        r = c.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("b.jsonl", (ok_line + "\n" + line).encode())},
        )
        refused(r, 400, "line_too_long", "file")
        assert "Line 2" in r.json()["error"]["message"]
        big = (ok_line + "\n").encode() * ((limits.max_upload_bytes + MB) // (len(ok_line) + 1))
        r = c.post("/v1/private/datasets", data={"name": "big"}, files={"file": ("d.jsonl", big)})
        refused(r, 413, "request_too_large", None)


def test_every_oversized_input_is_refused_and_the_server_still_answers(
    server: dict[str, Any],
) -> None:
    normal_request_succeeds(server)  # warm-up: the engine's own first-request allocations
    pid = server["srv"].proc.pid
    before = memory(pid)
    oversized_bodies(server)
    oversized_fields(server)
    oversized_uploads(server)
    normal_request_succeeds(server)
    after = memory(pid)
    print(f"server memory before/after the oversized inputs: {before} / {after}")
    assert after["VmHWM"] - before["VmHWM"] <= PEAK_GROWTH_BOUND, (before, after)
    metrics = server["srv"].metrics()
    assert 'status="413"' in metrics and 'status="500"' not in metrics


# -- configuration (no server) ---------------------------------------------------------------


def test_limits_come_from_flags_then_environment_then_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-body-bytes", "1000", "--max-n", "2"])
    limits = from_args(args, {"DPICL_MAX_MESSAGES": "7", "DPICL_MAX_N": "5"})
    assert (limits.max_body_bytes, limits.max_n, limits.max_messages) == (1000, 2, 7)
    assert limits.max_upload_bytes == DEFAULT_LIMITS.max_upload_bytes
    with pytest.raises(ValueError, match="DPICL_MAX_MESSAGES"):
        from_args(parser.parse_args([]), {"DPICL_MAX_MESSAGES": "many"})
    with pytest.raises(ValueError, match="max_n"):
        Limits(max_n=9)  # above the API's own ceiling
    with pytest.raises(ValueError):
        Limits(max_body_bytes=0)


def test_tokens_are_checked_against_the_context() -> None:
    assert Limits.check_tokens(10, None, 256, 100, "messages") == 90
    assert Limits.check_tokens(10, 20, 256, 100, "messages") == 20
    assert Limits.check_tokens(10, None, 256, None, "messages") == 256
