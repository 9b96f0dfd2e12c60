"""Continuous batching on the real embedded engine (SmolLM2, float32): a request's greedy
tokens are the same whether it ran alone (the step loop, a batch of one) or in a running batch
that other requests joined and left, and the resizable batch's merge/keep keep every row's
log-probabilities.

Why exact equality is expected in float32: a row's padding is masked (its attention weights
are exactly zero), positions are per row, and merging or dropping rows changes only the batch
and padding dimensions of the kernels, which moves a logit by float32 rounding (~1e-6) at most;
greedy decoding changes only where the top two log-probabilities are that close. The check
below asserts equality and, on a mismatch, reports the margin of the step-loop run at the first
differing position, so a true near-tie (margin < 1e-4) is told apart from a real bug.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from proxy.batching import BatchingBackend
from proxy.serving import SamplingParams, TokenEvent, generate

pytestmark = pytest.mark.model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "2+2=",
    "List three colours.",
    "Explain in one sentence why the sky is blue, for a child of six.",
    "Hi",
]


@pytest.fixture(scope="module")
def engine32() -> Any:
    from dp_decoding.engines.embedded import EmbeddedEngine

    return EmbeddedEngine(dtype="float32")


def _prompts(engine: Any) -> list[list[int]]:
    return [engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]


def _margin(engine: Any, prompt: list[int], prefix: list[int]) -> float:
    batch = engine.start([prompt + prefix])
    lp = np.sort(batch.logprobs()[0])
    batch.close()
    return float(lp[-1] - lp[-2])


def test_greedy_tokens_alone_equal_batched_with_joins_and_leaves(engine32: Any) -> None:
    prompts = _prompts(engine32)
    lengths = [16, 5, 16, 9, 16, 12]  # rows leave at different steps
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in lengths]
    alone = [
        [ev.token for ev in generate(engine32, p, sp)]
        for p, sp in zip(prompts, params, strict=True)
    ]
    backend = BatchingBackend(engine32, start_thread=False)
    streams = [backend.generate(p, sp) for p, sp in zip(prompts[:3], params[:3], strict=True)]
    for _ in range(3):
        backend.step()
    streams.append(backend.generate(prompts[3], params[3]))
    for _ in range(4):
        backend.step()
    streams += [backend.generate(p, sp) for p, sp in zip(prompts[4:], params[4:], strict=True)]
    while backend._rows or backend._pending:
        backend.step()
    batched: list[list[int]] = [[ev.token for ev in s] for s in streams]
    assert backend.stats["prefills"] == 3 and backend.stats["max_rows"] >= 4
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        if a != b:
            pairs = enumerate(zip(a, b, strict=False))
            at = next((j for j, (x, y) in pairs if x != y), min(len(a), len(b)))
            margin = _margin(engine32, prompts[i], a[:at])
            pytest.fail(f"request {i} differs at token {at}; step-loop top-2 margin {margin:.2e}")


def test_merge_and_keep_preserve_each_rows_logprobs(engine32: Any) -> None:
    prompts = _prompts(engine32)
    solo = []
    for p in prompts[:3]:
        b = engine32.start_serving([p])
        solo.append(b.logprobs()[0])
        b.close()
    batch = engine32.start_serving([prompts[0]])
    batch.merge(engine32.start_serving([prompts[1], prompts[2]]))
    lp = batch.logprobs()
    for i in range(3):
        np.testing.assert_allclose(lp[i], solo[i], atol=1e-4)
    batch.keep([2])  # the two others leave; the leading padding column(s) are dropped
    assert batch.rows == 1 and batch._mask.shape[1] == len(prompts[2])
    np.testing.assert_allclose(batch.logprobs()[0], solo[2], atol=1e-4)
    tok = int(np.argmax(solo[2]))
    batch.append([tok])
    ref = engine32.start([prompts[2] + [tok]])
    np.testing.assert_allclose(batch.logprobs()[0], ref.logprobs()[0], atol=1e-4)
    batch.close()
    ref.close()


def test_batched_streams_on_bf16_default_engine_finish(engine: Any) -> None:
    """The default engine (bf16 where the CPU has it): every request finishes with its own
    max_tokens or a stop (no exactness claim in bf16)."""
    backend = BatchingBackend(engine, start_thread=False)
    prompts = _prompts(engine)
    streams = [backend.generate(p, SamplingParams(max_tokens=6, temperature=0.0)) for p in prompts]
    while backend._rows or backend._pending:
        backend.step()
    events: list[list[TokenEvent]] = [list(s) for s in streams]
    assert all(ev[-1].finish_reason in ("stop", "length") and len(ev) <= 6 for ev in events)
