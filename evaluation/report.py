"""results.md (mean ± std over seeds, one row per method, one column per ε) and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.methods import BASELINES, DP_METHODS, EXTERNAL, METHODS

__all__ = ["POOL_NOTE", "plot", "write_markdown"]

POOL_NOTE = {
    "agnews": "paper: 30,000 per class; here ≈2,200",
    "dbpedia": "paper: 40,000 per class; here ≈700",
    "trec": "paper and here: 835 (Location)",
    "mit-g": "paper and here: 2,953",
    "mit-d": "paper and here: 1,561",
}


def _cell(entry: dict[str, Any] | None, metric: str, seeds: int | None = None) -> str:
    """``mean ± std`` over draws; the number of draws is shown when it differs from the run's
    ``--seeds`` (report-only over cells finished in parts)."""
    if not entry or metric not in entry:
        return "—"
    e = entry[metric]
    text = f"{e['mean']:.1f} ± {e['std']:.1f}" if e["n"] > 1 else f"{e['mean']:.1f}"
    return text + (f" (n={e['n']})" if seeds is not None and e["n"] != seeds else "")


def write_markdown(results: dict[str, Any], path: Path) -> None:
    cfg = results["config"]
    eps_cols = cfg["epsilons"]
    lines = [
        "# dpicl eval: accuracy (%) of in-context learning with DP demonstrations",
        "",
        f"Model SmolLM2-135M-Instruct ({cfg.get('engine', 'embedded')} engine"
        + (f", {cfg['dtype']}" if cfg.get("dtype") else "")
        + "). "
        f"δ = {cfg['delta']:g}. "
        f"Seeds: {cfg['seeds']} (mean ± std over seeds). Seed mode: {cfg['seed_mode']}. "
        f"Settings: {'paper' if cfg['paper_settings'] else 'budget'}"
        + (f", caps {cfg['override']}" if cfg["override"] else "")
        + ".",
        "",
    ]
    for task, by_shots in results["summary"].items():
        info = results["tasks"][task]
        metrics = ["calibrated", "accuracy"] if info["kind"] == "classification" else ["accuracy"]
        for shots, by_method in sorted(by_shots.items(), key=lambda kv: int(kv[0])):
            if shots == "0":
                continue
            for metric in metrics:
                name = {"calibrated": "calibrated", "accuracy": "raw"}[metric]
                if info["kind"] == "extraction":
                    name = "exact match"
                lines.append(f"## {task}, {shots} demonstrations, {name}")
                lines.append("")
                rows = cfg.get("report_rows")
                lines.append(
                    f"{info['test_rows']} test rows"
                    + (
                        f" (rows {rows[0]} to {rows[0] + info['test_rows'] - 1} only)"
                        if rows
                        else ""
                    )
                    + f". Pool size: {POOL_NOTE.get(task, '?')}."
                )
                lines.append("")
                header = ["method", "no DP"] + [f"ε={e}".replace("inf", "∞") for e in eps_cols]
                lines.append("| " + " | ".join(header) + " |")
                lines.append("|" + "---|" * len(header))
                zero = by_shots.get("0", {})
                for m in BASELINES:
                    src = zero if m.startswith("zero-shot") else by_method
                    if m in src:
                        seeds = None if m.startswith("zero-shot") else cfg["seeds"]
                        row = [METHODS[m], _cell(src[m].get("none"), metric, seeds)]
                        lines.append("| " + " | ".join(row + ["—"] * len(eps_cols)) + " |")
                for m in (*DP_METHODS, *EXTERNAL):
                    if m in by_method:
                        row = [METHODS[m], "—"] + [
                            _cell(by_method[m].get(e), metric, cfg["seeds"]) for e in eps_cols
                        ]
                        lines.append("| " + " | ".join(row) + " |")
                lines.append("")
            lines.append(f"Noise of the DP rows ({task}, {shots} demonstrations):")
            lines.append("")
            lines.append("| method | settings | ε target | ε achieved | σ (Gaussian) | ε₀ (exp.) |")
            lines.append("|---|---|---|---|---|---|")
            for m in DP_METHODS:
                st = info["settings"][m]
                desc = (
                    f"M={st['M']} N={st['N']} T={st['T']}"
                    + (f" q={st['q']:.4g}" if st.get("q") else "")
                    + (f" c={st['gate_cutoff']}" if st.get("gate_cutoff") else "")
                )
                for e in eps_cols:
                    ent = by_method.get(m, {}).get(e)
                    if not ent:
                        continue
                    ach = ent["epsilon_achieved"]
                    sig = ent["sigma"]
                    e0 = ent["epsilon0"]
                    lines.append(
                        f"| {m} | {desc} | {e} | "
                        f"{ach if isinstance(ach, str) else f'{ach:.3f}'} | "
                        f"{'—' if sig is None else f'{sig:.3g}'} | "
                        f"{'—' if e0 is None else (e0 if isinstance(e0, str) else f'{e0:.3g}')} |"
                    )
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(results: dict[str, Any], path: Path) -> None:
    """One line per task (and DP method), error bars over seeds, baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps_cols = results["config"]["epsilons"]
    finite = [float(e) for e in eps_cols if e != "inf"]
    inf_x = (max(finite) * 2) if finite else 1.0
    xs = [inf_x if e == "inf" else float(e) for e in eps_cols]
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (task, by_shots) in enumerate(results["summary"].items()):
        kind = results["tasks"][task]["kind"]
        metric = "calibrated" if kind == "classification" else "accuracy"
        shots = min((s for s in by_shots if s != "0"), key=int, default=None)
        if shots is None:
            continue
        c = colors[i % len(colors)]
        by_method = by_shots[shots]
        for m, style in (
            ("paper", "-o"),
            ("best", "--s"),
            ("blend", ":d"),
            ("wide", "-.^"),
            ("gate", "--v"),
            ("gate-long", "-v"),
            ("clipped", ":x"),
            ("clipped-gate-long", "-x"),
        ):
            pts = [(x, by_method.get(m, {}).get(e)) for x, e in zip(xs, eps_cols, strict=True)]
            pts = [(x, ent[metric]) for x, ent in pts if ent and metric in ent]
            if pts:
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1]["mean"] for p in pts],
                    yerr=[p[1]["std"] for p in pts],
                    fmt=style,
                    color=c,
                    capsize=3,
                    label=f"{task} DP ({m})",
                )
        zs = by_shots.get("0", {}).get("zero-shot", {}).get("none")
        if zs and metric in zs:
            ax.axhline(zs[metric]["mean"], color=c, ls=":", lw=1)
        real = by_method.get("real", {}).get("none")
        if real and metric in real:
            ax.axhline(real[metric]["mean"], color=c, ls="-.", lw=1)
        written = by_method.get("public", {}).get("none")  # the ε = 0 baseline
        if written and metric in written:
            ax.axhline(written[metric]["mean"], color=c, ls="--", lw=0.8, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels(["∞" if e == "inf" else e for e in eps_cols])
    ax.set_xlabel("ε (δ = 1e-6)")
    ax.set_ylabel("accuracy % (calibrated; MIT: exact match)")
    ax.set_title(
        "accuracy vs ε  (dotted: zero-shot; thin dashed: model-written; dash-dot: real)",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
