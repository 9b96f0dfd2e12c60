"""The clipped-difference exponential mechanism with top-k+ (dp_decoding/mechanisms/clipped.py,
docs/ARCHITECTURE.md §5): the ε bound on exact sampling laws of neighbouring inputs, the
top-k+ set, the sampler's law, calibration, and a plan through the fake engine.

Statistical tests: chi-square goodness of fit, rejected at p < 1e-6 (a false positive has
probability 1e-6 per check for a correct sampler); the file makes 3 such checks, so its
false-positive rate is below 3e-6. The power checks (the law at a wrong temperature must be
rejected) are deterministic given the seeded draws.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from accountant import JobEvent, epsilon
from dp_decoding.generate import DemoGenerator
from dp_decoding.mechanisms import ClippedExponential, RowMechanism, registry, top_k_plus
from dp_decoding.mechanisms.clipped import FLOAT_SLACK, clipped_logits, make_spec
from dp_decoding.noise import NoiseSource, SecureRandom
from dp_decoding.plan import PlanError, make_plan
from dp_decoding.records import Record
from prompts import generic_task
from tests.fakes import CountingRng, FakeEngine, two_label_records

P_REJECT = 1e-6


def _log_softmax(u: np.ndarray) -> np.ndarray:
    m = u.max()
    return u - m - np.log(np.exp(u - m).sum())


def _law(mech: ClippedExponential, rows: np.ndarray, public: np.ndarray) -> np.ndarray:
    """Exact log-probabilities of the sampler's law (the softmax of its logits)."""
    return _log_softmax(mech.logits(rows, public))


logprob = st.floats(-30.0, 0.0, allow_nan=False)


@st.composite
def neighbours(draw: st.DrawFn) -> tuple[ClippedExponential, np.ndarray, np.ndarray, np.ndarray]:
    """A mechanism, the public row, M private rows, and the rows with one of them replaced by
    an arbitrary row (add/remove of one unit changes one prompt; M stays declared)."""
    vocab = draw(st.integers(2, 8))
    prompts = draw(st.integers(1, 6))
    clip = draw(st.floats(0.05, 5.0))
    eps0 = draw(st.floats(0.01, 5.0))
    vec = st.lists(logprob | st.just(-math.inf), min_size=vocab, max_size=vocab)
    public = np.array(draw(st.lists(logprob, min_size=vocab, max_size=vocab)))
    rows = np.array([draw(vec) for _ in range(prompts)])
    other = rows.copy()
    other[draw(st.integers(0, prompts - 1))] = np.array(draw(vec))
    return ClippedExponential(eps0, clip, prompts), public, rows, other


@settings(max_examples=300, deadline=None)
@given(neighbours())
def test_epsilon_bound_on_exact_laws_of_neighbours(
    case: tuple[ClippedExponential, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """The log-ratio of the two exact sampling laws has range ≤ ε₀ over the tokens (ε₀-bounded
    range), hence |log-ratio| ≤ ε₀ (pure ε₀-DP): the event charged per token."""
    mech, public, rows, other = case
    ratio = _law(mech, rows, public) - _law(mech, other, public)
    assert float(ratio.max() - ratio.min()) <= mech.epsilon0
    assert float(np.abs(ratio).max()) <= mech.epsilon0
    # the same on a public sub-set of the columns (top-k+ restricts to one)
    keep = top_k_plus(public, 1, mech.clip)
    sub = _law(mech, rows[:, keep], public[keep]) - _law(mech, other[:, keep], public[keep])
    assert float(sub.max() - sub.min()) <= mech.epsilon0


def test_epsilon_bound_is_attained() -> None:
    """A row with +C on one token of little mass and −C on all others, replaced by its mirror
    image, moves the log-ratio's range by the full 4C/(Mτ) = ε₀/(1 + η): no factor is lost."""
    mech = ClippedExponential(0.5, 1.0, 3)
    vocab = 2000
    public = np.full(vocab, -math.log(vocab))
    row = public - 1.0
    row[0] = public[0] + 1.0
    mirror = public + 1.0
    mirror[0] = public[0] - 1.0
    rows = np.stack([public, public, row])
    other = np.stack([public, public, mirror])
    ratio = _law(mech, rows, public) - _law(mech, other, public)
    width = float(ratio.max() - ratio.min())
    assert width == pytest.approx(mech.epsilon0 / (1 + FLOAT_SLACK), rel=1e-9)
    assert float(np.abs(ratio).max()) > 0.95 * mech.epsilon0  # the pure-DP bound, nearly


@settings(max_examples=300, deadline=None)
@given(
    st.integers(3, 30).flatmap(
        lambda v: st.tuples(
            st.lists(logprob, min_size=v, max_size=v),
            st.lists(st.lists(logprob, min_size=v, max_size=v), min_size=1, max_size=5),
        )
    ),
    st.integers(1, 5),
    st.floats(0.05, 4.0),
)
def test_top_k_plus_holds_every_possible_top_k(
    case: tuple[list[float], list[list[float]]], k: int, clip: float
) -> None:
    """Whatever the private rows, the top k of the averaged clipped log-probabilities lie in
    the set computed from the public row, C and k alone; and the set is no larger than needed:
    each of its tokens enters the top k for some rows (+C on it, −C on every other)."""
    public, rows = np.array(case[0]), np.array(case[1])
    k = min(k, public.size)
    plus = set(top_k_plus(public, k, clip).tolist())
    avg = clipped_logits(rows, public, clip=clip, prompts=len(rows), temperature=0)
    top = np.argsort(-avg, kind="stable")[:k]
    # a token tied with the k-th value may be cut by the sort's order: all tied ones count
    assert set(np.flatnonzero(avg >= avg[top[-1]]).tolist()) <= plus
    assert set(np.argsort(-public, kind="stable")[:k].tolist()) <= plus
    for v in plus:
        extreme = public - clip
        extreme[v] = public[v] + clip
        best = clipped_logits(extreme[None, :], public, clip=clip, prompts=1, temperature=0)
        assert int((best > best[v] + 1e-9).sum()) < k


def test_sampler_law_chi_square() -> None:
    """Gumbel-max on a seeded numpy Generator draws softmax(u); the law at twice the
    temperature is rejected by the same counts (power)."""
    mech = ClippedExponential(0.8, 1.5, 3)
    rng = np.random.default_rng(11)
    public = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    rows = np.log(
        np.array(
            [
                [0.7, 0.1, 0.05, 0.05, 0.05, 0.05],
                [0.05, 0.05, 0.1, 0.1, 0.2, 0.5],  # differences beyond ±C: clipped
                [0.4, 0.25, 0.15, 0.1, 0.06, 0.04],
            ]
        )
    )
    n = 40_000
    counts = np.bincount([mech.select_rows(rows, public, rng) for _ in range(n)], minlength=6)
    law = np.exp(_law(mech, rows, public))
    assert stats.chisquare(counts, n * law).pvalue > P_REJECT
    hot = np.exp(_log_softmax(mech.logits(rows, public) / 2.0))
    assert stats.chisquare(counts, n * hot).pvalue < P_REJECT


def test_sampler_law_exact_source() -> None:
    """The service's source (OpenDP's exact noisy max) draws the same law."""
    mech = ClippedExponential(1.2, 1.0, 2)
    public = np.log(np.array([0.5, 0.3, 0.2]))
    rows = np.stack([public, np.log(np.array([0.1, 0.1, 0.8]))])
    n = 3000
    rng = SecureRandom()
    counts = np.bincount([mech.select_rows(rows, public, rng) for _ in range(n)], minlength=3)
    assert stats.chisquare(counts, n * np.exp(_law(mech, rows, public))).pvalue > P_REJECT


def test_temperature_and_event_follow_the_declared_clip_and_prompts() -> None:
    mech = ClippedExponential(0.3, 2.0, 16)
    assert 4 * mech.clip / (mech.prompts * mech.temperature) == pytest.approx(
        0.3 / (1 + FLOAT_SLACK), rel=1e-12
    )
    event = mech.event(24, None)
    assert event.mechanism == "exponential" and event.epsilon0 == 0.3 and event.steps == 24
    assert isinstance(mech, RowMechanism)
    with pytest.raises(TypeError):
        mech.select(np.zeros(3), np.random.default_rng(0))
    assert ClippedExponential(math.inf, 1.0, 4).temperature == 0.0


@pytest.mark.parametrize("steps", [1, 24, 64])
@pytest.mark.parametrize("eps0", [0.05, 0.3, 1.0])
def test_event_against_dp_accounting_and_closed_forms(steps: int, eps0: float) -> None:
    """The charged ε is at most each of: basic composition T·ε₀, dp_accounting's PLD of T pure
    ε₀-DP steps, dp_accounting's RDP of T (ε₀²/8)-zCDP steps, and the zCDP closed form
    ρ + 2√(ρ·log(1/δ)) with ρ = T·ε₀²/8."""
    delta = 1e-6
    got = epsilon(ClippedExponential(eps0, 1.0, 8).event(steps, None), delta)
    pure = pld.privacy_loss_distribution.from_privacy_parameters(
        pld.common.DifferentialPrivacyParameters(eps0, 0.0), value_discretization_interval=eps0
    )
    rdp_acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    rdp_acc.compose(dp_accounting.ZCDpEvent(eps0**2 / 8.0), steps)
    rho = steps * eps0**2 / 8.0
    assert got <= steps * eps0 * (1 + 1e-9)
    assert got <= pure.self_compose(steps).get_epsilon_for_delta(delta) * (1 + 1e-9)
    assert got <= rdp_acc.get_epsilon(delta) * (1 + 1e-6)
    assert got <= rho + 2 * math.sqrt(rho * math.log(1 / delta))
    if steps == 1:
        assert got <= eps0 * (1 + 1e-9)


@settings(max_examples=12, deadline=None)
@given(
    st.floats(0.5, 16.0),
    st.integers(1, 96),
    st.sampled_from([1e-5, 1e-6, 1e-8]),
    st.integers(2, 128),
)
def test_calibration_never_lands_above_target(
    target: float, tokens: int, delta: float, prompts: int
) -> None:
    plan = make_plan(
        labels=["A", "B"],
        epsilon=target,
        delta=delta,
        max_tokens=tokens,
        mechanism="clipped",
        prompts=prompts,
    )
    assert plan.epsilon() <= target
    mech = plan.mechanism_obj()
    assert isinstance(mech, ClippedExponential)
    assert mech.prompts == prompts and mech.top_k == plan.top_k
    looser = JobEvent("exponential", "fixed", plan.steps, epsilon0=mech.epsilon0 * 1.01)
    assert epsilon(looser, delta) > target  # within 1% of the largest feasible ε₀


def test_plan_refuses_public_prior() -> None:
    with pytest.raises(PlanError):
        make_plan(labels=["A"], mechanism="clipped", public_prior=1.0)
    with pytest.raises(PlanError):  # the gate needs public top-k, as for the exponential
        make_plan(labels=["A"], mechanism="clipped", gate_cutoff=4, candidates="all")


@settings(max_examples=8, deadline=None)
@given(
    st.floats(0.5, 16.0),
    st.integers(1, 24),
    st.sampled_from([1e-5, 1e-6, 1e-8]),
    st.integers(2, 128),
)
def test_the_gate_composes_as_for_the_exponential_mechanism(
    target: float, cutoff: int, delta: float, prompts: int
) -> None:
    """Gated, the clipped plan charges c rounds of (AboveThreshold at ε₀ + one ε₀-bounded-range
    draw): the gated exponential event, at the same ε₀; that event is within ε by dp_accounting
    (recomputed here: c-fold composition of two ε₀-DP mechanisms, the pure-DP PLD), and τ
    follows from that ε₀."""
    kw = dict(labels=["A", "B"], epsilon=target, delta=delta, max_tokens=24, prompts=prompts)
    gated = make_plan(mechanism="clipped", gate_cutoff=cutoff, **kw)  # type: ignore[arg-type]
    same = make_plan(mechanism="exponential", gate_cutoff=cutoff, public_prior=0.0, **kw)  # type: ignore[arg-type]
    assert gated.steps == cutoff
    assert gated.epsilon0 == same.epsilon0
    assert gated.epsilon() == same.epsilon()  # the same event, so the same ε, however computed
    gate = gated.gate_obj()
    assert gate is not None and gate.epsilon == gated.epsilon0  # one ε₀ for both parts
    assert gated.event() == JobEvent(
        "exponential", "fixed", cutoff, epsilon0=gated.epsilon0, gated=True
    )
    assert gated.epsilon() <= target
    eps0 = gated.epsilon0
    assert eps0 is not None
    round_pld = pld.privacy_loss_distribution.from_privacy_parameters(
        pld.common.DifferentialPrivacyParameters(2 * eps0, 0.0), value_discretization_interval=eps0
    )
    pure = round_pld.self_compose(cutoff).get_epsilon_for_delta(delta)
    assert gated.epsilon() <= pure * (1 + 1e-9)
    mech = gated.mechanism_obj()
    assert isinstance(mech, ClippedExponential)
    assert mech.epsilon0 == eps0
    assert mech.temperature == pytest.approx(4 * mech.clip * (1 + FLOAT_SLACK) / (prompts * eps0))


def _gated_clipped_run(theta: float, eps: float) -> list[tuple[int, str, bool]]:
    """Run a gated clipped plan (c = 2, 4 demonstrations of 8 tokens) through the fake engine;
    return its trace: (group id, event, value) for every gate answer ("above", its answer) and
    every clipped draw ("draw"), in order. Also checks what the gate is handed: the rows'
    candidate-renormalised sum (it sums to M) and the public row over the same candidates."""
    plan = make_plan(
        labels=["A", "B"],
        epsilon=eps,
        shots=2,
        max_tokens=8,
        prompts=4,
        mechanism="clipped",
        top_k=5,
        gate_cutoff=2,
        gate_threshold=theta,
    )
    gen = DemoGenerator(FakeEngine(), plan, generic_task(["A", "B"]), rng=np.random.default_rng(4))
    mech, gate = gen.row_mechanism, gen.gate
    assert isinstance(mech, ClippedExponential) and gate is not None
    trace: list[tuple[int, str, bool]] = []
    current = [0]
    decide, select_rows, above, distance = (
        gen.decision.decide,
        mech.select_rows,
        gate.above,
        gate.distance,
    )

    def spy_decide(g: Any, lp: Any, cand: Any, pub: Any) -> int:
        current[0] = id(g)
        assert lp is None or lp.shape[1] == len(cand)
        return decide(g, lp, cand, pub)

    def spy_distance(scores: np.ndarray, public: np.ndarray) -> float:
        assert scores.sum() == pytest.approx(plan.M) and public.shape == scores.shape
        return distance(scores, public)

    def spy_above(d: float, threshold: float, rng: NoiseSource) -> bool:
        out = above(d, threshold, rng)
        trace.append((current[0], "above", out))
        return out

    def spy_select(lp: np.ndarray, pub: np.ndarray, rng: NoiseSource) -> int:
        trace.append((current[0], "draw", True))
        return select_rows(lp, pub, rng)

    gen.decision.decide = spy_decide  # type: ignore[method-assign]  # test doubles below
    object.__setattr__(mech, "select_rows", spy_select)  # frozen dataclasses
    object.__setattr__(gate, "above", spy_above)
    object.__setattr__(gate, "distance", spy_distance)
    assert len(gen.run(two_label_records(24))) == 4
    return trace


@pytest.mark.parametrize(
    ("theta", "eps"), [(1e-6, 4.0), (1.0, 4.0), (1e-6, math.inf), (1.0, math.inf)]
)
def test_the_gate_in_front_of_the_clipped_draw(theta: float, eps: float) -> None:
    """Through the fake engine: every clipped draw follows an "above" answer of its own
    demonstration's gate, and only then; at most c = 2 draws per demonstration, after which
    its positions are public (no more gate answers). ε = ∞ is deterministic: with θ = 1 the
    exact distance (a TV < 1) is never above, so no draw at all; with a tiny θ nearly every
    position is above."""
    trace = _gated_clipped_run(theta, eps)
    draws: dict[int, int] = {}
    for i, (gid, event, value) in enumerate(trace):
        if event == "draw":
            assert i > 0 and trace[i - 1] == (gid, "above", True)
            draws[gid] = draws.get(gid, 0) + 1
        else:
            assert draws.get(gid, 0) < 2  # no gate answer once the cutoff is spent
        if event == "above" and value:
            assert i + 1 < len(trace) and trace[i + 1] == (gid, "draw", True)
    assert all(n <= 2 for n in draws.values())
    if math.isinf(eps) and theta == 1.0:
        assert not draws and trace  # the gate answered, always "below"
    if theta == 1e-6:
        assert sum(draws.values()) > 0


@pytest.mark.parametrize(
    ("regime", "candidates"),
    [("fixed", "public-topk"), ("fixed", "all"), ("resampled", "public-topk")],
)
def test_plan_through_the_fake_engine(regime: str, candidates: str) -> None:
    """One draw per released position; the public prompt runs in its own calls; with public
    top-k every selection's candidates hold the top-k+ set (plus the stop tokens)."""
    plan = make_plan(
        labels=["A", "B"],
        epsilon=4.0,
        shots=2,
        max_tokens=6,
        mechanism="clipped",
        prompts=4,
        candidates=candidates,
        top_k=5,
        regime=regime,
        q=0.5 if regime == "resampled" else None,
    )
    engine = FakeEngine()
    rng = CountingRng(5)
    gen = DemoGenerator(engine, plan, generic_task(["A", "B"]), rng=rng)  # type: ignore[arg-type]  # CountingRng duck-types the noise source
    seen: list[tuple[np.ndarray | None, np.ndarray | None]] = []
    inner = gen._candidates

    def spy(public_lp: np.ndarray | None) -> np.ndarray | None:
        out = inner(public_lp)
        seen.append((public_lp, out))
        return out

    gen._candidates = spy  # type: ignore[method-assign]  # test double: records each set
    demos = gen.run(two_label_records(24))
    positions = sum(d.tokens + (1 if d.tokens < plan.max_tokens else 0) for d in demos)
    assert rng.draws["gumbel"] == positions > 0
    assert not gen.uses_in_engine_aggregation()
    assert None in engine.widths  # the public prompt ran in its own (unpadded) batches
    for public_lp, cand in seen:
        assert public_lp is not None
        if candidates == "public-topk":
            assert cand is not None
            assert set(top_k_plus(public_lp, 5, 1.0).tolist()) <= set(cand.tolist())
        else:
            assert cand is None


class InEngineFake(FakeEngine):
    """Claims design 2; the clipped mechanism must not use it (no public row in the engine)."""

    supports_in_engine_aggregation = True

    def generate_aggregated(self, *args: object, **kwargs: object) -> list[object]:
        raise AssertionError("design 2 has no public row for the clipped mechanism")


def test_design_2_is_not_used_without_a_public_row() -> None:
    plan = make_plan(labels=["A", "B"], max_tokens=3, mechanism="clipped", candidates="all")
    gen = DemoGenerator(InEngineFake(), plan, generic_task(["A", "B"]))
    assert not gen.uses_in_engine_aggregation()
    assert len(gen.run(two_label_records(12))) == 2
    forced = DemoGenerator(InEngineFake(), plan, generic_task(["A", "B"]), in_engine=True)
    with pytest.raises(ValueError):
        forced.uses_in_engine_aggregation()


def test_another_clip_registers_under_its_own_name() -> None:
    spec = registry.register(make_spec(0.25, "clipped-0.25"))
    try:
        plan = make_plan(labels=["A"], mechanism="clipped-0.25", prompts=8)
        mech = plan.mechanism_obj()
        assert isinstance(mech, ClippedExponential) and mech.clip == 0.25
        assert plan.sensitivity == spec.sensitivity == 0.5
    finally:
        registry.unregister("clipped-0.25")


def test_cli_plan_and_generate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--mechanism clipped`` in ``dpicl plan`` (a subprocess) and ``dpicl generate``."""
    import dp_decoding.engines
    from proxy.cli import build_parser

    data = tmp_path / "d.jsonl"
    lines = (json.dumps({"text": f"t {i}", "label": "AB"[i % 2]}) for i in range(12))
    data.write_text("\n".join(lines) + "\n")
    common = ["--data", str(data), "--labels", "A,B", "--mechanism", "clipped", "--prompts", "4"]
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "plan", *common],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    shown = {line.split()[0]: line.split()[-1] for line in r.stdout.splitlines() if line.strip()}
    assert shown["mechanism"] == "clipped" and shown["sensitivity"] == "2"  # 2C, C = 1

    monkeypatch.setattr(dp_decoding.engines, "load_engine", lambda name: FakeEngine())
    out = tmp_path / "demos.json"
    args = build_parser().parse_args(
        ["generate", *common, "--max-tokens", "4", "--engine", "fake", "--out", str(out)]
        + ["--quiet"]
    )
    assert args.func(args) == 0
    assert json.loads(out.read_text())["plan"]["mechanism"] == "clipped"


@pytest.mark.model
def test_real_model_smoke(engine) -> None:
    """SmolLM2 through the step loop: the mechanism runs on real log-probabilities."""
    plan = make_plan(
        labels=["World", "Sports"], epsilon=4.0, max_tokens=4, mechanism="clipped", prompts=2
    )
    records = [
        Record(r.text, "World" if r.label == "A" else "Sports", r.unit)
        for r in two_label_records(8)
    ]
    gen = DemoGenerator(engine, plan, generic_task(["World", "Sports"]))
    demos = gen.run(records)
    assert [d.label for d in demos] == ["World", "Sports"]
    assert all(0 <= d.tokens <= 4 for d in demos)
