"""Chat and completions served by vLLM's own scheduler, on the private jobs' single engine.

``dpicl serve --engine vllm`` loads the model once, in :class:`~dp_decoding.engines.
vllm_engine.VLLMEngine` (``vllm.LLM`` with the engine core in this process). This module puts a
second front door on that same engine core: :class:`VLLMServing` owns one *driver thread* that
adds serving requests to ``llm.llm_engine`` and steps it, handing each request's
``RequestOutput`` deltas to the HTTP thread that waits for them. All serving requests in flight
are therefore scheduled by vLLM together (continuous batching: a new request joins at the next
step, finished ones leave), sampled by vLLM's sampler, detokenised and stopped by vLLM
(``stop``, ``n``, ``seed``, ``temperature``, ``top_p``, ``max_tokens``, ``logprobs``), and
streamed token by token.

Why not ``vllm.v1.engine.async_llm.AsyncLLM``: in vLLM 0.32 it always runs the engine core in a
separate process (``EngineCoreClient.make_client`` raises ``NotImplementedError`` for asyncio
without multiprocessing). The private jobs need the core in this process (the full-vocabulary
capture processor writes into this process's memory; in-engine aggregation needs the rows of a
step scheduled together in lockstep), so AsyncLLM beside ``VLLMEngine`` would hold a second copy
of the weights, and AsyncLLM instead of it would move the private core out of process. The
driver below is the in-process equivalent of AsyncLLM's output handler: add, step, dispatch.

Invariants:

* **One model copy.** Serving uses ``engine.llm.llm_engine``; nothing here loads weights.
* **Private and serving work never share a forward pass.** Kernels are not batch-invariant
  (docs/ARCHITECTURE.md §7: the public candidate prompt is never batched with private prompts, for the
  same reason), so a served token or log-probability computed in a batch holding private rows
  could depend on them. Phases are separated by the engine's lock, which this module replaces
  with a FIFO :class:`PhaseLock`: the driver holds it for a whole *serving wave* (from the first
  admitted request until the engine has no unfinished request), and a private step
  (``VLLMEngine._step`` → ``LLM.generate``) holds it for one engine call, so it always finds the
  engine empty of serving requests (``LLM.generate`` would otherwise step and swallow them).
* **No starvation either way.** A wave admits every request pending when it starts, and admits
  newcomers only while no private step waits for the lock; then it drains and hands over.
  Private steps and serving waves alternate under load.
* **Prefix-cache salts.** Serving requests carry ``serve:<HMAC(process key, tenant)>``: requests
  of one tenant share cached prefixes (demonstration sets), other tenants' and the private
  jobs' (fresh random salts without ``:``) never match.
* **Shapes.** Outputs are turned into :class:`proxy.serving.TokenEvent`, one per generated
  token, so the app's response builder (:mod:`proxy.responses`, and so the response shapes)
  is that of the step-loop path.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import APIError
from proxy.phases import PhaseLock, share_engine_lock
from proxy.serving import SamplingParams, TokenEvent

__all__ = ["PhaseLock", "VLLMServing", "share_engine_lock"]

log = logging.getLogger("dpicl.serving")

_DONE = object()  # end-of-stream marker in a request's output queue


@dataclass
class _Request:
    """One serving request: what to add, and where its outputs go (read by one consumer)."""

    rid: str
    prompt: Any  # vllm TokensInput
    params: Any  # vllm SamplingParams
    out: queue.Queue[Any] = field(default_factory=queue.Queue)


class VLLMServing:
    """Serving backend over a :class:`~dp_decoding.engines.vllm_engine.VLLMEngine`.

    ``generate`` validates and enqueues at call time (so bad input is a 400 before any stream
    starts) and returns an iterator of :class:`TokenEvent`; closing that iterator early (a
    client that disconnects from a stream) aborts the request in vLLM.
    """

    def __init__(self, engine: Any) -> None:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind

        self.engine = engine
        self._VSamplingParams = VSamplingParams
        self._tokens_input = tokens_input
        self._delta = RequestOutputKind.DELTA
        self._llm_engine = engine.llm.llm_engine
        self.max_model_len = int(self._llm_engine.model_config.max_model_len)
        self.max_logprobs = int(getattr(self._llm_engine.model_config, "max_logprobs", 20))
        self._stop_ids = sorted(int(t) for t in engine.eos_token_ids)
        self._filler = self._stop_ids[0]
        self._lock = share_engine_lock(engine)
        self._salt_key = secrets.token_bytes(32)
        self._cv = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._aborts: set[str] = set()
        self._live: dict[str, _Request] = {}  # added to vLLM, not finished; driver thread only
        self._closed = False
        self._thread = threading.Thread(target=self._drive, name="dpicl-vllm-serving", daemon=True)
        self._thread.start()
        log.info(
            "chat/completions are served by vLLM's scheduler (continuous batching) on the "
            "private jobs' engine; private steps and serving waves take turns"
        )

    # -- public ------------------------------------------------------------------------------
    def cache_salt(self, tenant: str | None) -> str:
        """The prefix-cache salt of a tenant's serving requests (never a private job's)."""
        mac = hmac.new(self._salt_key, (tenant or "").encode(), hashlib.sha256).hexdigest()
        return "serve:" + mac[:32]

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, tenant: str | None = None
    ) -> Iterator[TokenEvent]:
        """Submit one request (``params.n`` choices) now; iterate its tokens as they come."""
        if len(prompt_ids) >= self.max_model_len:
            raise APIError(
                400,
                f"The prompt is {len(prompt_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens, prompt and completion together.",
                param="messages",
                code="context_length_exceeded",
            )
        if params.top_logprobs > self.max_logprobs:
            raise APIError(400, f"At most {self.max_logprobs} top log-probabilities.")
        try:
            vparams = self._VSamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                stop=list(params.stop) or None,
                stop_token_ids=self._stop_ids,
                max_tokens=min(params.max_tokens, self.max_model_len - len(prompt_ids)),
                logprobs=params.top_logprobs,  # 0: the sampled token's own log-probability
                output_kind=self._delta,
            )
        except ValueError as exc:
            raise APIError(400, f"Invalid sampling parameters: {exc}") from None
        req = _Request(
            rid="srv-" + uuid.uuid4().hex,
            prompt=self._tokens_input(list(prompt_ids), cache_salt=self.cache_salt(tenant)),
            params=vparams,
        )
        with self._cv:
            if self._closed:
                raise RuntimeError("the vLLM serving backend is closed")
            self._pending.append(req)
            self._cv.notify_all()
        return self._events(req, params.n, params.top_logprobs)

    def close(self) -> None:
        """Stop the driver after its current wave; pending requests fail."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # -- consumer side (HTTP threads) --------------------------------------------------------
    def _events(self, req: _Request, n: int, top_k: int) -> Iterator[TokenEvent]:
        finished = False
        last = [self._filler] * n
        try:
            while True:
                item = req.out.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                for c in item.outputs:
                    if c.finish_reason in ("abort", "error"):
                        finished = True
                        raise RuntimeError(f"generation ended with {c.finish_reason!r}")
                    yield from self._choice_events(c, top_k, last)
        finally:
            if not finished:
                self._abort(req.rid)

    def _choice_events(self, c: Any, top_k: int, last: list[int]) -> Iterator[TokenEvent]:
        """One ``TokenEvent`` per token of a choice's delta; its text and finish reason ride on
        the delta's last token (vLLM holds back text that may start a stop string)."""
        tokens = list(c.token_ids)
        lps = c.logprobs
        finish = c.finish_reason
        if not tokens:
            if c.text or finish:  # no new token but text/finish to deliver (not seen in 0.32)
                yield TokenEvent(c.index, last[c.index], c.text, 0.0, [], finish)
            return
        for j, tok in enumerate(tokens):
            at = lps[j] if lps is not None and j < len(lps) else None
            logprob = float(at[tok].logprob) if at is not None and tok in at else 0.0
            top: list[tuple[int, float]] = []
            if at is not None and top_k:
                ranked = [(v.rank or 0, t, v.logprob) for t, v in at.items()]
                top = [(int(t), float(lp)) for r, t, lp in sorted(ranked) if 0 < r <= top_k]
            final = j == len(tokens) - 1
            yield TokenEvent(
                c.index, int(tok), c.text if final else "", logprob, top, finish if final else None
            )
        last[c.index] = int(tokens[-1])

    def _abort(self, rid: str) -> None:
        with self._cv:
            for req in self._pending:
                if req.rid == rid:  # not admitted yet: just drop it
                    self._pending.remove(req)
                    return
            self._aborts.add(rid)
            self._cv.notify_all()

    # -- driver thread -----------------------------------------------------------------------
    def _drive(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed and not self._pending:
                    return
            with self._lock:  # the serving phase: no private step runs until it ends
                try:
                    self._wave()
                except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
                    log.error("vLLM serving step failed (%s)", type(exc).__name__)
                    self._fail_live(exc)
            if self._closed:
                with self._cv:
                    while self._pending:
                        self._pending.popleft().out.put(RuntimeError("server shutting down"))
                return

    def _wave(self) -> None:
        """Admit, step and dispatch until the engine holds no serving request."""
        eng = self._llm_engine
        admit_all = True
        while True:
            self._admit(admit_all or self._lock.waiting == 0)
            admit_all = False
            self._apply_aborts()
            if not self._live:
                return
            for out in eng.step():
                req = self._live.get(out.request_id)
                if req is None:
                    continue
                req.out.put(out)
                if out.finished:
                    del self._live[out.request_id]
                    req.out.put(_DONE)

    def _admit(self, newcomers: bool) -> None:
        if not newcomers:
            return
        with self._cv:
            batch = list(self._pending)
            self._pending.clear()
        for req in batch:
            try:
                self._llm_engine.add_request(req.rid, req.prompt, req.params)
            except Exception as exc:  # noqa: BLE001 - refused by vLLM's validation
                req.out.put(
                    APIError(400, f"The request was refused by the engine: {exc}")
                    if isinstance(exc, ValueError)
                    else exc
                )
                continue
            self._live[req.rid] = req

    def _apply_aborts(self) -> None:
        """Abort the live requests whose consumer went away; forget aborts of requests that
        already finished (runs on the driver thread after ``_admit``, so no request is
        between the pending queue and ``_live`` here)."""
        with self._cv:
            if not self._aborts:
                return
            mine = {rid for rid in self._aborts if rid in self._live}
            self._aborts.clear()
        if mine:
            self._llm_engine.abort_request(sorted(mine))
            for rid in mine:
                self._live.pop(rid).out.put(_DONE)

    def _fail_live(self, exc: BaseException) -> None:
        live, self._live = self._live, {}
        if live:
            try:
                self._llm_engine.abort_request(sorted(live))
            except Exception:  # noqa: BLE001
                log.error("could not abort the failed serving requests")
        for req in live.values():
            req.out.put(RuntimeError(f"generation failed ({type(exc).__name__})"))


__all__ = ["PhaseLock", "VLLMServing"]
