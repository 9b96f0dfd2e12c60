"""The noise source: the OS-CSPRNG generator's samplers, OpenDP's exact samplers, and the
mechanisms' laws when they draw from it (the service's source, not a seeded numpy Generator).

False-positive rates, derived:
- Kolmogorov–Smirnov checks use the Dvoretzky–Kiefer–Wolfowitz inequality with Massart's
  constant, ``P(√n·sup|F_n − F| > t) ≤ 2·exp(−2t²)`` for every n: with ``t = 2.6934``
  (``2·exp(−2t²) = 1.0e-6``) each check fails for a correct sampler with probability ≤ 1e-6.
  The file makes 5 (uniform, Gumbel, Laplace, normal, OpenDP grid Laplace).
- Count checks use |z| < 5 against exact probabilities (normal approximation to the binomial,
  n ≥ 8,000, p ≥ 0.1): each fails with probability < 5.8e-7; the file makes 13.
Total below 5 × 1e-6 + 13 × 5.8e-7 < 1.3e-5. The power check rejects a 20% wrong Laplace scale
at √n·sup|ΔF| ≈ 10.6 against the 2.69 cut (its own failure chance is negligible).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from dp_decoding import noise
from dp_decoding.mechanisms import (
    EXACT_MAX_CANDIDATES,
    GATE_GRID,
    GATE_GRID_K,
    GATE_ROUNDED_SENSITIVITY,
    ExponentialMechanism,
    GaussianNoisyArgmax,
    PublicTokenGate,
)
from dp_decoding.noise import SecureRandom, os_entropy_rng

KS_T = math.sqrt(math.log(2 / 1e-6) / 2)  # 2.6934: DKW–Massart tail 1e-6
Z = 5.0
N = 100_000


def _ks_stat(x: np.ndarray, cdf) -> float:
    """√n · sup |F_n − F| (both one-sided gaps at every sample point)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = x.size
    f = cdf(x)
    gap = max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))
    return math.sqrt(n) * float(gap)


def _laplace_cdf(x: np.ndarray, b: float) -> np.ndarray:
    return np.where(x < 0, 0.5 * np.exp(np.minimum(x, 0) / b), 1 - 0.5 * np.exp(-np.abs(x) / b))


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.array([math.erfc(-v / math.sqrt(2)) for v in x])


def _z(hits: int, n: int, p: float) -> float:
    return (hits - n * p) / math.sqrt(n * p * (1 - p))


def test_os_entropy_rng_is_the_csprng_source() -> None:
    a, b = os_entropy_rng(), os_entropy_rng()
    assert isinstance(a, SecureRandom)
    assert not isinstance(a, np.random.Generator)  # no seedable user-space state
    assert not np.array_equal(a.random(8), b.random(8))
    # the numpy-compatible surface the generation loop and the mechanisms use
    assert isinstance(a.random(), float) and a.random(5).shape == (5,)
    assert a.gumbel(size=(2, 3)).shape == (2, 3)
    assert isinstance(a.laplace(0.0, 2.0), float) and a.normal(0.0, 1.0, size=7).shape == (7,)


@pytest.mark.parametrize("word", [0, 2**64 - 1])
def test_extreme_words_give_finite_noise(monkeypatch: pytest.MonkeyPatch, word: int) -> None:
    """The all-zero and all-one 64-bit words map to uniforms strictly inside (0, 1): the
    inversions never take log(0)."""
    monkeypatch.setattr(noise, "_words", lambda n: np.full(n, word, dtype=np.uint64))
    r = SecureRandom()
    u = r._open_uniform(4)
    assert np.all((u > 0) & (u < 1))
    assert 0 <= r.random() < 1
    for draw in (r.gumbel(size=4), r.laplace(size=4), r.normal(size=4)):
        assert np.all(np.isfinite(draw))
    # the open uniforms are symmetric: the extremes are 2⁻⁵³ and 1 − 2⁻⁵³ exactly
    assert u[0] == (2.0**-53 if word == 0 else 1 - 2.0**-53)


@pytest.mark.parametrize(
    ("name", "cdf"),
    [
        ("random", lambda x: np.clip(x, 0, 1)),
        ("gumbel", lambda x: np.exp(-np.exp(-x))),
        ("laplace", lambda x: _laplace_cdf(x, 1.0)),
        ("normal", _normal_cdf),
    ],
)
def test_secure_samplers_pass_ks_at_1e_6(name: str, cdf) -> None:
    x = getattr(SecureRandom(), name)(size=N)
    assert _ks_stat(x, cdf) < KS_T


def test_ks_check_has_power() -> None:
    """The same check rejects a 20% wrong scale (it is not vacuous)."""
    x = SecureRandom().laplace(0.0, 1.2, size=N)
    assert _ks_stat(x, lambda v: _laplace_cdf(v, 1.0)) > KS_T


def test_opendp_grid_laplace_law_and_map() -> None:
    """OpenDP's grid Laplace is the continuous Laplace up to the grid; its own privacy map
    charges the rounded sensitivity 1 + g, and the gate's widened scales give ε/2 and ε/4."""
    r = SecureRandom()
    b = 4.0
    x = np.array([r.grid_laplace(0.0, b, GATE_GRID_K) for _ in range(20_000)])
    assert np.all(np.rint(x / GATE_GRID) * GATE_GRID == x)  # on the grid
    # the grid moves the CDF by ≤ g/b ≈ 2.4e-7, far inside the KS margin
    assert _ks_stat(x, lambda v: _laplace_cdf(v, b)) < KS_T
    eps = 0.7
    for factor, share in ((2.0, 2.0), (4.0, 4.0)):
        scale = factor * GATE_ROUNDED_SENSITIVITY / eps
        charged = noise._opendp_laplace(scale, GATE_GRID_K).map(1.0)
        assert charged <= eps / share * (1 + 1e-12)


def test_opendp_noisy_max_law_and_map() -> None:
    """OpenDP's Gumbel report-noisy-max picks v with probability ∝ exp(z_v); its map at
    scale 1 for logits moving by ε₀/2 is ρ = ε₀²/8, the exponential mechanism's zCDP."""
    r = SecureRandom()
    z = np.array([0.0, 0.5, 1.25])
    trials = 8_000
    counts = np.bincount([r.exact_noisy_max(z) for _ in range(trials)], minlength=3)
    p = np.exp(z) / np.exp(z).sum()
    for c, pv in zip(counts, p, strict=True):
        assert abs(_z(int(c), trials, float(pv))) < Z
    eps0 = 0.9
    assert noise._opendp_noisy_max().map(eps0 / 2) == pytest.approx(eps0**2 / 8, rel=1e-9)


@pytest.mark.parametrize("extra", [0, EXACT_MAX_CANDIDATES])
def test_exponential_law_with_the_secure_source(extra: int) -> None:
    """Both paths (OpenDP for few candidates, CSPRNG Gumbel-max above the cutoff) sample
    ∝ exp(ε₀·s/2); ``extra`` zero-score candidates are pooled into one outcome."""
    eps0, trials = 1.0, 8_000
    scores = np.concatenate([[1.0, 2.5, 0.0], np.zeros(extra)])
    mech = ExponentialMechanism(eps0)
    rng = os_entropy_rng()
    picks = np.array([mech.select(scores, rng) for _ in range(trials)])
    w = np.exp(eps0 * scores / 2)
    p = w / w.sum()
    assert abs(_z(int((picks == 0).sum()), trials, float(p[0]))) < Z
    assert abs(_z(int((picks == 1).sum()), trials, float(p[1]))) < Z
    assert abs(_z(int((picks >= 2).sum()), trials, float(p[2:].sum()))) < Z


def test_exponential_prior_minus_inf_is_never_picked() -> None:
    mech = ExponentialMechanism(1.0, prior_weight=1.0)
    prior = np.array([math.log(0.5), -math.inf, math.log(0.5)])
    rng = os_entropy_rng()
    assert all(mech.select(np.array([0.0, 3.0, 0.0]), rng, prior) != 1 for _ in range(200))


def test_gaussian_law_with_the_secure_source() -> None:
    sigma, trials = 2.0, 8_000
    rng = os_entropy_rng()
    hits = sum(
        GaussianNoisyArgmax(sigma).select(np.array([0.0, sigma]), rng) for _ in range(trials)
    )
    p = 0.5 * math.erfc(-1 / math.sqrt(2) / math.sqrt(2))
    assert abs(_z(hits, trials, p)) < Z


def test_gate_laws_with_the_secure_source() -> None:
    """P(above) = P(Lap(4/ε) ≥ t − d) and P(threshold ≤ x) from Lap(2/ε), up to the grid."""
    eps, trials, members = 0.5, 8_000, 10
    rng = os_entropy_rng()
    gate = PublicTokenGate(eps, 0.4, 1)
    gap = 3.0
    hits = sum(gate.above(5.0 - gap, 5.0, rng) for _ in range(trials))
    b4 = 4 * GATE_ROUNDED_SENSITIVITY / eps
    assert abs(_z(hits, trials, float(1 - _laplace_cdf(np.array(gap), b4)))) < Z
    draws = np.array([gate.new_threshold(members, rng) for _ in range(trials)])
    b2 = 2 * GATE_ROUNDED_SENSITIVITY / eps
    for x in (-1.0, 2.5):
        p = float(_laplace_cdf(np.array(x), b2))
        assert abs(_z(int((draws <= 4.0 + x).sum()), trials, p)) < Z
