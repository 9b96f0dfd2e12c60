"""The rows of the evaluation table: every method's name, description and declared constants.

Invariant: every constant here is declared a priori (from the paper or from the accounting
alone), never searched on test data; :mod:`evaluation.runner` builds the cells from them and
:mod:`evaluation.report` only reads them (so neither imports the other for these names).
"""

from __future__ import annotations

__all__ = [
    "BASELINES",
    "CLIPPED",
    "DECLARED_METHODS",
    "DEFAULT_METHODS",
    "DP_METHODS",
    "EXTERNAL",
    "GATED",
    "GATE_CUTOFF",
    "GATE_THRESHOLD",
    "METHODS",
    "NO_INF_ROW",
    "PAPER_T",
    "WIDE_M",
]

WIDE_M = 128
"""M of the ``wide`` rows, declared a priori: the fixed regime puts every unit in one prompt,
so many prompts cost no extra ε; 128 prompts of N = 2 use 256 records per label, within the
smallest declared pool (DBPedia: 690 per label)."""

GATE_CUTOFF = 5
"""c of the ``gate`` rows, declared from the accounting alone: the largest cutoff at which a
private token gets at least the ε0 of the ungated plan (T = 20) at every ε of the grid
(ε = 1: 0.111 vs 0.099; c = 6 would give 0.098)."""
GATE_THRESHOLD = 0.5
"""θ of the ``gate`` rows, declared: a position is private when the private vote moves at
least half of the probability mass away from the public prediction (TV ≥ 0.5, noisily)."""

METHODS: dict[str, str] = {
    "zero-shot": "zero-shot",
    "zero-shot-chat": "zero-shot (chat template)",
    "real": "real demonstrations (non-private)",
    "public": "model-written, no private data (ε = 0)",
    "public-long": "model-written, no private data (ε = 0), at the paper's T",
    "paper": "DP, paper settings (resampled, Gaussian, public top-100)",
    "best": "DP, dpicl best (fixed batches, exponential, public top-50)",
    "blend": "DP, dpicl best with the public prior (exponential × public model, λ = 1)",
    "wide": f"DP, dpicl fixed batches at M = {WIDE_M} (exponential, public top-50)",
    "gate": f"DP, dpicl best with the public-token gate (M = {WIDE_M}, c = {GATE_CUTOFF}, "
    f"θ = {GATE_THRESHOLD}, public prior λ = 1)",
    "gate-long": f"DP, public-token gate at the paper's T (M = {WIDE_M}, c = {GATE_CUTOFF}, "
    f"θ = {GATE_THRESHOLD}, λ = 1; T costs no ε under the gate)",
    "clipped": f"DP, clipped log-probability differences with top-k+ (M = {WIDE_M}, C = 1, "
    "public top-50+, no prior)",
    "clipped-gate-long": f"DP, clipped top-k+ behind the public-token gate at the paper's T "
    f"(M = {WIDE_M}, C = 1, c = {GATE_CUTOFF}, θ = {GATE_THRESHOLD}, no prior)",
    "invink": "DP, the peer invink 0.1.0 (InvisibleInk) on the same pools and ε (--demos-file)",
    "preset": "DP at the plan's defaults, the preset task's prompts",
    "generic": "DP at the plan's defaults, generic prompts without a description",
    "described": "DP at the plan's defaults, generic prompts with a declared description "
    "and label words",
}
DECLARED_METHODS = ("preset", "generic", "described")
"""The generic path's rows (:mod:`evaluation.declared`): opt-in, with an on-topic rate."""
DP_METHODS = (
    "paper",
    "best",
    "blend",
    "wide",
    "gate",
    "gate-long",
    "clipped",
    "clipped-gate-long",
    *DECLARED_METHODS,
)
GATED = ("gate", "gate-long", "clipped-gate-long")
CLIPPED = ("clipped", "clipped-gate-long")
"""Rows of the clipped mechanism (no public prior: its spec refuses one)."""
PAPER_T = ("public-long", "gate-long", "clipped-gate-long")
"""Rows whose demonstration length is the paper's T for the task (DBPedia and AGNews: 100
tokens) instead of the budget rows' T. Declared from the paper, not searched: under the gate
T costs no ε, and the model-written baseline is reported at the same T for a matched
comparison."""
EXTERNAL = ("invink",)
"""Rows whose demonstrations come from a demos file made outside dpicl
(:mod:`evaluation.external`; bench/peer_invink.py), scored like every other row."""
DEFAULT_METHODS = [
    m for m in METHODS if m not in ("wide", "clipped", *GATED, *DECLARED_METHODS, *EXTERNAL)
]
"""``all`` minus ``wide``, ``clipped`` and the gated rows (M = 128 prompts per demonstration:
minutes per cell on CPU), the generic path's rows and the external rows (need a file)."""
BASELINES = ("zero-shot", "zero-shot-chat", "real", "public", "public-long")
NO_INF_ROW = ("blend", "gate")
"""DP rows with no ε = ∞ cell: at ε = ∞ the exponential mechanism is the argmax and ignores the
prior, so 'blend' would repeat 'best'; 'gate' at ε = ∞ is a noiseless switch between the
private argmax and public draws, reported once, for 'gate-long', as the gated rows' ceiling."""
