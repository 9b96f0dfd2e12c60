"""The upstream engine: any OpenAI-compatible ``/v1/completions`` server behind the engine
protocol (a remote vLLM, or an OpenAI-style API that returns log-probabilities).

How a step works: every live row of a batch goes out in *one* ``POST /v1/completions`` as a
list of token-id lists (``prompt: [[...], [...]]``) with ``max_tokens=1``, ``temperature=0``;
the rows are kept client-side and resubmitted whole on the next step, and the server's prefix
cache does the reuse. The sampled token of these calls is discarded: all selection happens in
the DP mechanism, which sees only the returned array.

The candidate set is required. An API returns log-probabilities for a few tokens, never the
whole vocabulary, so a private batch answers ``logprobs(candidates)`` for a *declared* candidate
id list and ``logprobs(None)`` raises :class:`CandidateSetRequired`. Selecting among whatever
tokens the private prompts happened to return (their top-k) would make the candidate set depend
on private data and is never done. Two ways to read the candidates (``candidate_mode``):

- ``"logprob_token_ids"`` (vLLM, the default for ``server="vllm"``): vLLM's completions
  extension ``logprob_token_ids`` returns exactly the requested ids' log-probabilities,
  normalised over the full vocabulary (with ``logprobs`` set, as vLLM requires). At most
  ``max_logprob_token_ids`` (vLLM's ``MAX_LOGPROB_TOKEN_IDS``, 128) ids a request: a longer
  list is split into several requests, each still holding all rows. ``-9999`` (vLLM's JSON
  stand-in for ``-inf``) is read back as ``-inf``.
- ``"logit_bias"`` (OpenAI-style APIs that cap ``logprobs`` at 5 or 20; the reference DP-ICL
  code's method): a chunk of at most ``top_logprobs`` candidates gets the same large bias
  ``B = logit_bias`` so that exactly those tokens fill the returned top log-probabilities.
  *How the bias is undone.* For tokens t, u of one chunk the returned (biased) values are
  ``l_t + B − D`` and ``l_u + B − D`` with one per-row normaliser D, so their *difference* is
  the unbiased ``l_t − l_u``: B and D cancel. With more candidates than fit in one request,
  every later chunk also carries an anchor token a from the first chunk (the one whose worst
  row value is highest), and ``l_t − l_a`` stitches the chunks together. Finally each row is
  renormalised over the requested ids (log-sum-exp), which removes the one unknown per-row
  constant. So in this mode a row holds ``log p(t | t ∈ candidates)`` — *not* full-vocabulary
  normalised — which is all the mechanism uses: :func:`dp_decoding.mechanisms.aggregate`
  renormalises every row over its candidates anyway. A candidate missing from a biased answer
  has probability below ``e^−B`` times some other token's (another token beat it by more than
  B) and is read as ``-inf``; a row whose anchor is missing from a later chunk reads that
  chunk as ``-inf`` (the anchor is then more than B nats below some token for that row).
  The server's log-probabilities must reflect ``logit_bias`` (OpenAI's do; vLLM's only with
  ``--logprobs-mode processed_logprobs``): a data-free self-check on a fixed public prompt runs
  before the first probe and raises :class:`UpstreamError` if they do not.

Public top-K candidates: the candidate set is then the top-K of a *public* prompt (instruction
only, no private records). ``start(prompts, public=True)`` marks such a batch; its
``logprobs(None)`` asks the server for the top ``public_top_k`` log-probabilities of each row
(no private data is in these requests) and returns them as a ``[rows, V]`` array that is
``-inf`` outside the returned tokens, so taking its top-K (K ≤ ``public_top_k``) gives the
server's top-K. Public batches are separate requests, never batched with private rows.
Serve vLLM with ``--max-logprobs`` ≥ the plan's ``top_k`` (vLLM's default is 20).

Secrets: every batch gets a fresh random ``cache_salt`` (vLLM's prefix-cache salt), so its KV
blocks are reachable only by its own later steps and no other client can time the cache to
probe a private prompt. No seed, job key or noise is ever put in a request. Errors never carry
prompt text or token ids: :class:`UpstreamError` states the endpoint, the HTTP status and the
server's error ``type``/``param`` (identifier characters only), never the server's message or
body, which may echo the prompt; it is raised outside the ``except`` block, so no chained
exception holds the request or response either.

``candidate_mode`` and :meth:`UpstreamEngine.describe` record how the candidates' values were
obtained, next to the plan's own ``candidates`` / ``top_k`` / ``candidate_token_ids``.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import httpx
import numpy as np

from dp_decoding.engines.base import check_prompts, left_pad
from dp_decoding.engines.resubmitted_rows import ResubmittedRows
from dp_decoding.engines.upstream_tokenizers import load_tokenizer

CandidateMode = Literal["logprob_token_ids", "logit_bias"]
ServerKind = Literal["vllm", "openai"]

VLLM_TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
OPENAI_TOP_LOGPROBS = 5  # OpenAI's cap on `logprobs` in /v1/completions
MAX_LOGPROB_TOKEN_IDS = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS (0.32)
JSON_NEG_INF = -9999.0  # vLLM writes -inf log-probabilities as -9999.0
_IDENT = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class UpstreamError(RuntimeError):
    """The upstream server failed or answered something unusable. The message never holds
    prompt text, token ids or the server's own message (which may echo the prompt)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class CandidateSetRequired(ValueError):
    """Full-vocabulary log-probabilities were asked of a private upstream batch."""


# -- the engine ---------------------------------------------------------------------------------
class UpstreamEngine:
    """An OpenAI-compatible completions server behind the engine protocol.

    ``server="vllm"`` sends vLLM's extensions (``logprob_token_ids``, ``cache_salt``,
    ``return_tokens_as_token_ids``); ``server="openai"`` sends only OpenAI's documented
    parameters and maps ``top_logprobs`` keys (token texts) back to ids through the tokenizer.
    ``client`` (an ``httpx.Client``) or ``transport`` (e.g. ``httpx.MockTransport``) replace
    the network. Thread-safe: ``httpx.Client`` is, and the engine keeps no per-step state.
    """

    marks_public_batches = True
    """:class:`DemoGenerator` passes ``public=True`` when it starts the public prompt's batch."""

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        *,
        api_key: str | None = None,
        tokenizer: str | Path | Any | None = None,
        server: ServerKind | None = None,
        candidate_mode: CandidateMode | None = None,
        top_logprobs: int | None = None,
        public_top_k: int | None = None,
        logit_bias: float = 100.0,
        max_logprob_token_ids: int = MAX_LOGPROB_TOKEN_IDS,
        vocab_size: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 300.0,
    ) -> None:
        base_url = base_url or os.environ.get("DPICL_UPSTREAM_BASE_URL")
        model = model or os.environ.get("DPICL_UPSTREAM_MODEL")
        if not base_url or not model:
            raise ValueError(
                "the upstream engine needs base_url= and model= "
                "(or DPICL_UPSTREAM_BASE_URL and DPICL_UPSTREAM_MODEL)"
            )
        api_key = api_key or os.environ.get("DPICL_UPSTREAM_API_KEY")
        if tokenizer is None:
            tokenizer = os.environ.get("DPICL_UPSTREAM_TOKENIZER") or None
        kind = server or os.environ.get("DPICL_UPSTREAM_SERVER") or "vllm"
        if kind not in ("vllm", "openai"):
            raise ValueError("server must be 'vllm' or 'openai'")
        mode = candidate_mode or ("logprob_token_ids" if kind == "vllm" else "logit_bias")
        if mode not in ("logprob_token_ids", "logit_bias"):
            raise ValueError("candidate_mode must be 'logprob_token_ids' or 'logit_bias'")
        if mode == "logprob_token_ids" and kind != "vllm":
            raise ValueError("candidate_mode='logprob_token_ids' is a vLLM extension")
        if not logit_bias > 0:
            raise ValueError("logit_bias must be positive")

        self.server = cast(ServerKind, kind)  # one of ServerKind's values, checked above
        self.candidate_mode: CandidateMode = mode
        self.top_logprobs = int(
            top_logprobs or (VLLM_TOP_LOGPROBS if kind == "vllm" else OPENAI_TOP_LOGPROBS)
        )
        self.public_top_k = int(public_top_k or self.top_logprobs)
        if self.top_logprobs < 2 and mode == "logit_bias":
            raise ValueError("logit-bias probing needs top_logprobs >= 2")
        self.logit_bias = float(logit_bias)
        self.max_logprob_token_ids = int(max_logprob_token_ids)
        self.model = model
        self.name = model
        self._tok = load_tokenizer(tokenizer, model, vocab_size)
        self.vocab_size = int(vocab_size or self._tok.vocab_size)
        self.eos_token_ids = frozenset(
            int(t) for t in (eos_token_ids if eos_token_ids is not None else self._tok.eos_ids())
        )

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if client is None:
            client = httpx.Client(
                headers=headers,
                timeout=timeout,
                transport=transport,
            )
            self._owns_client = True
        else:
            client.headers.update(headers)
            self._owns_client = False
        self.client = client
        base = base_url.rstrip("/")
        self._url = base + ("/completions" if base.endswith("/v1") else "/v1/completions")
        self._checked_bias = False
        self._check_lock = threading.Lock()

    # -- tokenizer ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._tok.tokenize(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(token_ids)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self._tok.apply_chat_template(messages)

    # -- metadata ----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Public facts about how log-probabilities are obtained (for a job's metadata). The
        base URL is left out: it may carry credentials."""
        d: dict[str, Any] = {
            "engine": "upstream",
            "model": self.model,
            "server": self.server,
            "candidate_mode": self.candidate_mode,
            "public_top_k": self.public_top_k,
        }
        if self.candidate_mode == "logit_bias":
            d["logit_bias"] = self.logit_bias
            d["top_logprobs"] = self.top_logprobs
        return d

    def close(self) -> None:
        """Close the HTTP client if the engine created it."""
        if self._owns_client:
            self.client.close()

    # -- batches -----------------------------------------------------------------------------
    def start(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        public: bool = False,
        cache_salt: str | None = None,
        width: int | None = None,
    ) -> UpstreamBatch:
        """A batch of rows (token ids). ``public=True`` declares that the prompts hold no
        private records (the public candidate prompt), which allows ``logprobs(None)``.
        ``cache_salt`` defaults to a fresh random salt for this batch. ``width`` left-pads
        every row with an end-of-text token to that many tokens (real context: a remote
        server has no attention mask for it), so every request has declared shapes; how the
        remote server batches them with other traffic is outside this process (README)."""
        check_prompts(prompts, width)
        pad = min(self.eos_token_ids)
        rows = [left_pad(p, width, pad) for p in prompts]
        return UpstreamBatch(self, rows, cache_salt or secrets.token_urlsafe(32), public)

    # -- HTTP ----------------------------------------------------------------------------------
    def _payload(self, rows: list[list[int]], salt: str, logprobs: int) -> dict[str, Any]:
        """The parameters every step request carries; never a seed, key or noise."""
        payload: dict[str, Any] = {
            "model": self.model,
            "prompt": rows,
            "max_tokens": 1,
            "temperature": 0.0,
            "n": 1,
            "stream": False,
            "logprobs": int(logprobs),
        }
        if self.server == "vllm":
            payload["cache_salt"] = salt
            payload["return_tokens_as_token_ids"] = True
        return payload

    def _post(self, payload: dict[str, Any], n_rows: int) -> list[dict[str, float]]:
        """One completions request; each row's ``top_logprobs`` of its first generated token,
        in row order. Every failure becomes an :class:`UpstreamError` raised outside the
        ``except`` block (no chained exception keeps the request or the response)."""
        where = "upstream POST /v1/completions"
        error: UpstreamError | None = None
        response: httpx.Response | None = None
        try:
            response = self.client.post(self._url, json=payload)
        except httpx.HTTPError as e:
            error = UpstreamError(f"{where} failed: {type(e).__name__}")
        if error is not None:
            raise error
        assert response is not None
        if response.status_code != 200:
            raise UpstreamError(
                f"{where} returned HTTP {response.status_code}{_error_fields(response)}",
                status_code=response.status_code,
            )
        try:
            data = response.json()
        except ValueError:
            error = UpstreamError(f"{where} returned a body that is not JSON")
        if error is not None:
            raise error
        return _top_logprobs(data, n_rows, where)

    # -- candidate log-probabilities --------------------------------------------------------
    def _candidate_logprobs(self, rows: list[list[int]], salt: str, ids: list[int]) -> np.ndarray:
        """``[rows, len(ids)]`` log-probabilities of the (distinct) ``ids``."""
        if self.candidate_mode == "logprob_token_ids":
            return self._by_token_ids(rows, salt, ids)
        return self._by_logit_bias(rows, salt, ids)

    def _by_token_ids(self, rows: list[list[int]], salt: str, ids: list[int]) -> np.ndarray:
        out = np.empty((len(rows), len(ids)), dtype=np.float32)
        step = self.max_logprob_token_ids
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            payload = self._payload(rows, salt, len(chunk))
            payload["logprob_token_ids"] = chunk
            tops = self._post(payload, len(rows))
            keys = {self._key(t): j for j, t in enumerate(chunk)}
            for i, top in enumerate(tops):
                got = _read(top, keys, len(chunk))
                if np.isnan(got).any():
                    raise UpstreamError(
                        "upstream ignored logprob_token_ids (a vLLM extension); use "
                        "candidate_mode='logit_bias' for this server"
                    )
                out[i, start : start + len(chunk)] = got
        return out

    def _by_logit_bias(self, rows: list[list[int]], salt: str, ids: list[int]) -> np.ndarray:
        self._check_bias_reflected()
        k = self.top_logprobs
        chunks = _chunks(ids, [self._key(t) for t in ids], k)
        first = self._probe(rows, salt, chunks[0])
        vals = np.full((len(rows), len(ids)), -np.inf)
        col = {t: j for j, t in enumerate(ids)}
        for j, t in enumerate(chunks[0]):
            vals[:, col[t]] = first[:, j]
        if len(chunks) > 1:
            key_count: dict[str, int] = {}
            for t in ids:
                key_count[self._key(t)] = key_count.get(self._key(t), 0) + 1
            eligible = [j for j, t in enumerate(chunks[0]) if key_count[self._key(t)] == 1]
            if not eligible:
                raise UpstreamError("logit-bias probing: no anchor token with a unique key")
            worst = first[:, eligible].min(axis=0)
            a = eligible[int(np.argmax(worst))]  # the anchor: highest worst-row value
            anchor = chunks[0][a]
            for chunk in chunks[1:]:
                lp = self._probe(rows, salt, [anchor, *chunk])
                shift = first[:, a] - lp[:, 0]  # per row: l_anchor (chunk 0) − l_anchor (here)
                for j, t in enumerate(chunk):
                    v = lp[:, j + 1] + shift
                    vals[:, col[t]] = np.where(np.isfinite(shift), v, -np.inf)
        with np.errstate(invalid="ignore"):
            m = vals.max(axis=1, keepdims=True)
            m = np.where(np.isfinite(m), m, 0.0)
            z = np.log(np.exp(vals - m).sum(axis=1, keepdims=True)) + m
        return np.where(np.isfinite(z), vals - z, -np.inf).astype(np.float32)

    def _probe(self, rows: list[list[int]], salt: str, chunk: list[int]) -> np.ndarray:
        """Biased log-probabilities of one chunk (all rows, one request); -inf where absent."""
        payload = self._payload(rows, salt, self.top_logprobs)
        payload["logit_bias"] = {str(t): self.logit_bias for t in chunk}
        tops = self._post(payload, len(rows))
        keys = {self._key(t): j for j, t in enumerate(chunk)}
        out = np.stack([_read(top, keys, len(chunk)) for top in tops]).astype(np.float64)
        return np.where(np.isnan(out), -np.inf, out)

    def _check_bias_reflected(self) -> None:
        """Data-free self-check (a fixed public prompt, once): the server's log-probabilities
        must include ``logit_bias``, or probing would read unbiased top-k lists as absences."""
        if self._checked_bias:
            return
        with self._check_lock:
            if self._checked_bias:
                return
            prompt = self.tokenize("The weather today is")
            probe = sorted({self.tokenize(" banana")[-1], self.tokenize(" quantum")[-1]})
            lp = self._probe([prompt], secrets.token_urlsafe(32), probe)[0]
            if not (np.isfinite(lp).all() and np.logaddexp.reduce(lp) > np.log(0.5)):
                raise UpstreamError(
                    "upstream log-probabilities do not reflect logit_bias, so logit-bias "
                    "probing cannot work (vLLM: serve with --logprobs-mode processed_logprobs, "
                    "or use candidate_mode='logprob_token_ids')"
                )
            self._checked_bias = True

    def _public_topk(self, rows: list[list[int]], salt: str) -> np.ndarray:
        """``[rows, V]``: the server's top ``public_top_k`` log-probabilities, -inf elsewhere."""
        tops = self._post(self._payload(rows, salt, self.public_top_k), len(rows))
        out = np.full((len(rows), self.vocab_size), -np.inf, dtype=np.float32)
        for i, top in enumerate(tops):
            for key, value in top.items():
                t = self._id_of_key(key)
                if t is not None and 0 <= t < self.vocab_size:
                    out[i, t] = -np.inf if value <= JSON_NEG_INF else value
        return out

    def _key(self, token_id: int) -> str:
        """How the server names a token in ``top_logprobs``."""
        if self.server == "vllm":
            return f"token_id:{int(token_id)}"
        return self._tok.token_text(int(token_id))

    def _id_of_key(self, key: str) -> int | None:
        if key.startswith("token_id:"):
            try:
                return int(key[len("token_id:") :])
            except ValueError:
                return None
        ids = self.tokenize(key)
        return ids[0] if len(ids) == 1 else None


class UpstreamBatch(ResubmittedRows):
    """Rows of one generation, kept client-side and resubmitted whole each step (the server's
    prefix cache, salted per batch, does the reuse). A second read of the same step with the
    same candidates is served from memory, without a request."""

    def __init__(
        self, engine: UpstreamEngine, prompts: Sequence[Sequence[int]], salt: str, public: bool
    ) -> None:
        self._engine = engine
        super().__init__(prompts)
        self.cache_salt = salt
        self.public = public
        self._memo: dict[bytes | None, np.ndarray] = {}

    def logprobs(self, candidates: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """``[rows, K]`` log-probabilities of ``candidates`` (see the module docstring for
        the normalisation in each ``candidate_mode``); ``None`` only on a public batch."""
        live = self._live_rows()
        eng = self._engine
        if candidates is None:
            if not self.public:
                raise CandidateSetRequired(
                    "the upstream engine cannot return full-vocabulary log-probabilities for "
                    "private prompts: declare a candidate set (candidates='list') or use "
                    "public top-k candidates (the public prompt's batch is started with "
                    "start(..., public=True))"
                )
            if None not in self._memo:
                self._memo[None] = eng._public_topk(live, self.cache_salt)
            return self._memo[None]
        cand = np.asarray(candidates, dtype=np.int64).reshape(-1)
        if cand.size and (cand.min() < 0 or cand.max() >= eng.vocab_size):
            raise ValueError(f"candidate ids must lie in [0, {eng.vocab_size})")
        memo_key = cand.tobytes()
        if memo_key not in self._memo:
            if cand.size == 0:
                self._memo[memo_key] = np.empty((self.rows, 0), dtype=np.float32)
            else:
                uniq, inverse = np.unique(cand, return_inverse=True)
                lp = eng._candidate_logprobs(live, self.cache_salt, uniq.tolist())
                self._memo[memo_key] = lp[:, inverse.reshape(-1)]
        return self._memo[memo_key]

    def append(self, tokens: Sequence[int]) -> None:
        self._extend(tokens)
        self._memo.clear()

    def close(self) -> None:
        # Nothing is held server-side beyond prefix-cache blocks reachable only with this
        # batch's salt, which is forgotten here.
        self._rows = None
        self._memo.clear()


# -- response parsing ---------------------------------------------------------------------------
def _error_fields(response: httpx.Response) -> str:
    """`` (type=..., param=...)`` from an OpenAI-shaped error body, identifier characters only;
    the server's message is never copied (it may quote the prompt)."""
    try:
        err = response.json().get("error")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(err, dict):
        return ""
    parts = [
        f"{name}={value}"
        for name in ("type", "param", "code")
        if isinstance(value := err.get(name), str | int)
        and not isinstance(value, bool)
        and _IDENT.fullmatch(str(value))
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _top_logprobs(data: Any, n_rows: int, where: str) -> list[dict[str, float]]:
    """Each row's ``choices[i].logprobs.top_logprobs[0]``, ordered by choice index."""
    try:
        choices = sorted(data["choices"], key=lambda c: int(c["index"]))
        if len(choices) != n_rows or [int(c["index"]) for c in choices] != list(range(n_rows)):
            raise ValueError
        tops = [c["logprobs"]["top_logprobs"][0] for c in choices]
        return [{str(k): float(v) for k, v in top.items()} for top in tops]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        pass
    raise UpstreamError(f"{where}: unexpected response shape (no top_logprobs for every row)")


def _read(top: dict[str, float], keys: dict[str, int], n: int) -> np.ndarray:
    """The requested tokens' values from one row's ``top_logprobs`` (NaN where absent)."""
    out = np.full(n, np.nan)
    for key, value in top.items():
        j = keys.get(key)
        if j is not None:
            out[j] = -np.inf if value <= JSON_NEG_INF else value
    return out


def _chunks(ids: list[int], keys: list[str], k: int) -> list[list[int]]:
    """Split ``ids`` for probing: the first chunk holds up to ``k`` ids, later ones ``k − 1``
    (their first slot is the anchor's); no two ids of one chunk share a key (their answers
    could not be told apart)."""
    chunks: list[list[int]] = []
    chunk_keys: list[set[str]] = []
    for t, key in zip(ids, keys, strict=True):
        for c, ck in zip(chunks, chunk_keys, strict=True):
            cap = k if c is chunks[0] else k - 1
            if len(c) < cap and key not in ck:
                c.append(t)
                ck.add(key)
                break
        else:
            chunks.append([t])
            chunk_keys.append({key})
    return chunks
