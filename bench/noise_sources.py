"""Benchmark: per-draw cost of the noise sources, old against new against OpenDP.

For each sampler on the hot path and each size served (the full SmolLM2 vocabulary, 49,152
candidates, and the public top-50), times one complete draw as a mechanism makes it:

- ``old``: numpy float samplers on ``PCG64DXSM`` seeded from ``secrets`` (before this change);
- ``new``: :class:`dp_decoding.noise.SecureRandom` (OS CSPRNG uniforms, float inversions);
- ``OpenDP``: the exact / discrete samplers of ``opendp`` (Gumbel report-noisy-max, discrete
  Gaussian at granularity 2⁻²⁰ then argmax, discrete Laplace at granularity 2⁻²⁰).

Each figure is the median over ``--repeats`` calls (after one warm-up call), in microseconds.
Prints a Markdown table to stdout. Run from the repository root:
``python bench/noise_sources.py``.
"""

from __future__ import annotations

import argparse
import platform
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.machine import cpu_model  # noqa: E402
from dp_decoding import noise  # noqa: E402
from dp_decoding.mechanisms import GATE_GRID_K  # noqa: E402

VOCAB, TOP = 49_152, 50


def median_us(f: Any, repeats: int) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return 1e6 * statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21, help="calls per figure (median)")
    args = ap.parse_args()
    r = args.repeats

    old = np.random.Generator(np.random.PCG64DXSM(secrets.randbits(256)))
    new = noise.SecureRandom()
    dp = noise._opendp()
    data = np.random.default_rng(0)
    rows: list[tuple[str, str, float, float, float | None, str]] = []

    for k, decision in (
        (VOCAB, "new (CSPRNG Gumbel-max): OpenDP exact costs as much as a decoding step"),
        (TOP, "OpenDP exact (used up to 1,024 candidates)"),
    ):
        z = data.random(k) * 40
        exact = noise._opendp_noisy_max()
        zl = [float(v) for v in z]
        rows.append(
            (
                "exponential mechanism (Gumbel-max / report-noisy-max)",
                f"{k:,}",
                median_us(lambda z=z: np.argmax(z + old.gumbel(size=z.shape)), r),
                median_us(lambda z=z: np.argmax(z + new.gumbel(size=z.shape)), r),
                median_us(lambda zl=zl, exact=exact: exact(zl), r if k == TOP else max(5, r // 3)),
                decision,
            )
        )
    for k, decision in (
        (VOCAB, "new (Box–Muller on CSPRNG): discrete Gaussian far too slow"),
        (TOP, "new: discrete Gaussian matches the charged Gaussian PLD only in zCDP"),
    ):
        s = data.random(k) * 40
        space = (
            dp.vector_domain(dp.atom_domain(T=float, nan=False), size=k),
            dp.l2_distance(T=float),
        )
        dgauss = dp.m.make_gaussian(*space, scale=2.0, k=GATE_GRID_K)
        sl = [float(v) for v in s]
        rows.append(
            (
                "Gaussian noisy argmax",
                f"{k:,}",
                median_us(lambda s=s: np.argmax(s + old.normal(0.0, 2.0, size=s.shape)), r),
                median_us(lambda s=s: np.argmax(s + new.normal(0.0, 2.0, size=s.shape)), r),
                median_us(lambda sl=sl, g=dgauss: np.argmax(g(sl)), 3 if k == VOCAB else r),
                decision,
            )
        )
    rows.append(
        (
            "gate Laplace (one draw; two per position)",
            "1",
            median_us(lambda: old.laplace(0.0, 8.0), 10 * r),
            median_us(lambda: new.laplace(0.0, 8.0), 10 * r),
            median_us(lambda: new.grid_laplace(3.3, 8.0, GATE_GRID_K), 10 * r),
            "OpenDP discrete Laplace on the 2⁻²⁰ grid",
        )
    )
    rows.append(
        (
            "Poisson subsampling uniforms",
            "10,000",
            median_us(lambda: old.random(10_000), r),
            median_us(lambda: new.random(10_000), r),
            None,
            "new (one draw per job and wave, not per token)",
        )
    )

    from importlib.metadata import version

    print(f"Machine: {cpu_model()}; Python {platform.python_version()}, numpy {np.__version__}, ")
    print(f"opendp {version('opendp')}; median of {r} calls (fewer for the slowest cells).\n")
    print("| sampler | size | old PCG64DXSM (µs) | new SecureRandom (µs) | OpenDP (µs) | used |")
    print("|---|---:|---:|---:|---:|---|")
    for name, size, a, b, c, d in rows:
        cc = "—" if c is None else f"{c:,.0f}"
        print(f"| {name} | {size} | {a:,.1f} | {b:,.1f} | {cc} | {d} |")


if __name__ == "__main__":
    main()
