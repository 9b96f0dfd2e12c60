"""The embedded engine on the real SmolLM2 model: batching, padding and KV reuse agree with
single-sequence full recomputation."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.model

# bf16 weights: recomputing a prefix along another kernel path moves far-tail log-probabilities
# (p < 1e-5) by up to ~0.4 nats here, while the distributions' total-variation distance stays
# below 0.03 and the argmax stays put. We compare distributions, which is what aggregation uses.
TV_TOL = 0.05


def tv(a: np.ndarray, b: np.ndarray) -> float:
    return float(
        0.5 * np.abs(np.exp(a.astype(np.float64)) - np.exp(b.astype(np.float64))).sum(-1).max()
    )


def test_left_padding_does_not_change_rows(engine) -> None:
    a = engine.tokenize("News Type: World\nText: The president said on Monday that")
    b = engine.tokenize("Hello")
    both = engine.start([a, b]).logprobs()
    alone_a = engine.start([a]).logprobs()[0]
    alone_b = engine.start([b]).logprobs()[0]
    assert both.shape == (2, engine.vocab_size)
    assert tv(both[0], alone_a) < TV_TOL
    assert tv(both[1], alone_b) < TV_TOL
    assert both[1].argmax() == alone_b.argmax()


def test_kv_cache_step_matches_reprefill(engine) -> None:
    prompts = [engine.tokenize("The capital of France is"), engine.tokenize("1, 2, 3, 4,")]
    batch = engine.start(prompts)
    for _ in range(3):
        toks = [int(t) for t in batch.logprobs().argmax(axis=1)]
        batch.append(toks)
        prompts = [p + [t] for p, t in zip(prompts, toks, strict=True)]
    cached = batch.logprobs()
    fresh = engine.start(prompts).logprobs()
    assert (cached.argmax(axis=1) == fresh.argmax(axis=1)).all()
    assert tv(cached, fresh) < TV_TOL
    assert batch.kv_bytes() > 0


def test_candidate_columns_and_normalisation(engine) -> None:
    batch = engine.start([engine.tokenize("Once upon a time")])
    full = batch.logprobs()
    cand = [5, 17, 300]
    assert np.allclose(batch.logprobs(cand), full[:, cand])
    assert np.isclose(np.exp(full.astype(np.float64)).sum(), 1.0, atol=1e-3)


def test_bad_batches_are_refused(engine) -> None:
    with pytest.raises(ValueError):
        engine.start([])
    with pytest.raises(ValueError):
        engine.start([[]])
    batch = engine.start([[5], [6]])
    with pytest.raises(ValueError):
        batch.append([1])
