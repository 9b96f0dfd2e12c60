"""Randomness for the mechanisms: the OS CSPRNG unless a test fixes a seed.

:func:`os_entropy_rng` returns a :class:`SecureRandom`, made once per job. Its invariant: every
bit of noise that a mechanism, the gate or the subsampler consumes comes from the operating
system's cryptographically secure generator (``os.urandom``, i.e. ``getrandom(2)``), or from
OpenDP's samplers, whose bits come from its own CSPRNG (a thread-local AES CTR_DRBG, NIST SP
800-90A, seeded from OS entropy); this module keeps no seed and no generator state to recover,
and nothing is logged. Its methods mirror the few
``numpy.random.Generator`` methods the generation loop calls (``random``, ``gumbel``,
``laplace``, ``normal``), so a seeded ``numpy.random.Generator`` can stand in for it in tests
(duck typing), plus two exact samplers from OpenDP (:meth:`SecureRandom.grid_laplace`,
:meth:`SecureRandom.exact_noisy_max`) that the gate and the exponential mechanism use when
present (see ``dp_decoding/mechanisms/``; docs/benchmarks.md (noise sources) has the measured costs).

Uniforms: ``random`` returns ``k·2⁻⁵³`` for a uniform 53-bit ``k`` (numpy's convention: in
[0, 1), so ``u < q`` has probability exactly ``q`` for ``q`` on that grid). The samplers that
take a logarithm use open uniforms ``(k + ½)·2⁻⁵²`` for a uniform 52-bit ``k``: every value is
exact in float64, lies in [2⁻⁵³, 1 − 2⁻⁵³] (never 0 or 1), and the law is symmetric under
``u ↦ 1 − u``. Gumbel and Laplace are by inversion, the normal by Box–Muller.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
from typing import Any, TypeAlias

import numpy as np

_TWO_M53 = 2.0**-53
_TWO_M52 = 2.0**-52


def _words(n: int) -> np.ndarray:
    """``n`` uniform 64-bit words from the OS CSPRNG."""
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64)


def _count(size: Any) -> tuple[int, tuple[int, ...] | None]:
    if size is None:
        return 1, None
    # Not tested inline: as a condition, np.isscalar's TypeGuard narrows ``size`` to numpy's scalar
    # union (str and bytes included), which ``int()`` is not typed to take.
    scalar = np.isscalar(size)
    shape = (int(size),) if scalar else tuple(int(d) for d in size)
    return math.prod(shape), shape


def _shaped(x: np.ndarray, shape: tuple[int, ...] | None) -> Any:
    return float(x[0]) if shape is None else x.reshape(shape)


class SecureRandom:
    """Noise from the OS CSPRNG; the numpy-Generator subset the mechanisms use, plus OpenDP's
    exact samplers. Stateless (every call reads fresh OS entropy), so safe to share."""

    def _open_uniform(self, n: int) -> np.ndarray:
        """``n`` uniforms ``(k + ½)·2⁻⁵²`` in (0, 1): exact, never 0 or 1."""
        k = _words(n) >> np.uint64(12)
        return (k.astype(np.float64) + 0.5) * _TWO_M52

    def random(self, size: Any = None) -> Any:
        """Uniform on [0, 1) with 53-bit resolution (``numpy.random.Generator.random``)."""
        n, shape = _count(size)
        k = _words(n) >> np.uint64(11)
        return _shaped(k.astype(np.float64) * _TWO_M53, shape)

    def gumbel(self, loc: float = 0.0, scale: float = 1.0, size: Any = None) -> Any:
        """Standard Gumbel by inversion, ``−log(−log u)``."""
        n, shape = _count(size)
        g = -np.log(-np.log(self._open_uniform(n)))
        return _shaped(loc + scale * g, shape)

    def laplace(self, loc: float = 0.0, scale: float = 1.0, size: Any = None) -> Any:
        """Laplace by inversion: ``v = u − ½``, ``x = −sign(v)·log(1 − 2|v|)``."""
        n, shape = _count(size)
        v = self._open_uniform(n) - 0.5  # exact; 1 − 2|v| ≥ 2⁻⁵² > 0
        x = -np.sign(v) * np.log1p(-2.0 * np.abs(v))
        return _shaped(loc + scale * x, shape)

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: Any = None) -> Any:
        """Normal by Box–Muller (both outputs of each pair are used)."""
        n, shape = _count(size)
        pairs = (n + 1) // 2
        u = self._open_uniform(2 * pairs)
        r = np.sqrt(-2.0 * np.log(u[:pairs]))
        t = (2.0 * math.pi) * u[pairs:]
        z = np.concatenate([r * np.cos(t), r * np.sin(t)])[:n]
        return _shaped(loc + scale * z, shape)

    # -- exact samplers (OpenDP) -----------------------------------------------------------
    def grid_laplace(self, x: float, scale: float, k: int) -> float:
        """``x`` rounded to the nearest multiple of ``2^k``, plus ``2^k·DLap(scale / 2^k)``:
        OpenDP's ``make_laplace`` on floats with granularity ``2^k`` (exact discrete Laplace;
        its privacy map charges ``(Δ + 2^k) / scale``)."""
        return float(_opendp_laplace(float(scale), int(k))(float(x)))

    def exact_noisy_max(self, logits: np.ndarray) -> int:
        """``argmax(z + Gumbel)`` sampled exactly for the float logits ``z`` given, i.e. index
        ``v`` with probability exactly ``∝ exp(z_v)``: OpenDP's ``make_noisy_max`` with Gumbel
        noise (zero-concentrated-divergence output measure) at scale 1."""
        return int(_opendp_noisy_max()([float(v) for v in logits]))


@functools.cache
def _opendp() -> Any:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


@functools.lru_cache(maxsize=64)
def _opendp_laplace(scale: float, k: int) -> Any:
    dp = _opendp()
    space = dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float)
    return dp.m.make_laplace(*space, scale=scale, k=k)


@functools.cache
def _opendp_noisy_max() -> Any:
    dp = _opendp()
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.linf_distance(T=float)
    return dp.m.make_noisy_max(*space, dp.zero_concentrated_divergence(), scale=1.0)


NoiseSource: TypeAlias = np.random.Generator | SecureRandom
"""What a mechanism draws its noise from: the OS CSPRNG in service, a seeded numpy Generator in
tests."""


def os_entropy_rng() -> SecureRandom:
    """The noise source for one job: the OS CSPRNG (see the module docstring)."""
    return SecureRandom()


def new_job_key() -> bytes:
    """A per-job secret for slot hashing (32 bytes from the OS CSPRNG)."""
    return secrets.token_bytes(32)
