"""Summaries, markdown tables and the plot of the merge-quality benchmark.

Input: per seed, per row key, per group ("heldout"/"train"), per sensor, ``{"nrmse", "mae"}``.
Every figure is a mean over seeds of a mean over sensors; ratios divide two such means of the
same run (a row by its family's output ensemble).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GROUPS = ("heldout", "train")
Scores = dict[str, dict[str, dict[str, float]]]  # group -> sensor -> {"nrmse", "mae"}


def summarize(per_seed: Sequence[dict[str, Scores]], refs: dict[str, str]) -> dict[str, Any]:
    """Mean/sd over seeds of each row's sensor-mean nRMSE and MAE, per-sensor means, ratios.

    ``refs`` maps each row key to the row it is compared with (its family's ensemble).
    """
    keys = [k for k in refs if any(k in seed for seed in per_seed)]
    out: dict[str, Any] = {}
    for key in keys:
        out[key] = {g: _group_summary([seed[key][g] for seed in per_seed if key in seed])
                    for g in GROUPS}
    for key in keys:
        ref = out.get(refs[key])
        for g in GROUPS:
            mine, base = out[key][g], (ref or {}).get(g)
            if mine:
                mine["ratio"] = mine["nrmse"] / base["nrmse"] if base else None
    return out


def _group_summary(seeds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Summary of one row in one group over seeds (empty dict if the row has no such sensors)."""
    seeds = [s for s in seeds if s]
    if not seeds:
        return {}
    nrmse = [np.mean([v["nrmse"] for v in s.values()]) for s in seeds]
    mae = [np.mean([v["mae"] for v in s.values()]) for s in seeds]
    sensors = list(seeds[0])
    return {
        "nrmse": float(np.mean(nrmse)), "nrmse_sd": float(np.std(nrmse)),
        "mae": float(np.mean(mae)), "mae_sd": float(np.std(mae)),
        "seeds": len(seeds),
        "per_sensor": {s: {m: float(np.mean([sd[s][m] for sd in seeds])) for m in ("nrmse", "mae")}
                       for s in sensors},
    }


# ── markdown ───────────────────────────────────────────────────────────────────────────────


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _cell(summary: dict[str, Any], group: str, what: str) -> str:
    g = summary.get(group) or {}
    if what == "nrmse":
        if not g:
            return "—"
        sd = f" ± {g['nrmse_sd']:.3f}" if g["seeds"] > 1 else ""
        return f"{g['nrmse']:.3f}{sd}"
    if what == "ratio":
        return _num(g.get("ratio"), ".2f") + ("x" if g.get("ratio") is not None else "")
    return _num(g.get("mae"), ".1f")


def main_table(summary: dict[str, Any], labels: dict[str, tuple[str, str]],
               ref_labels: dict[str, str]) -> str:
    """One line per row: held-out and training sensors' nRMSE (± sd over seeds), ratio, MAE.

    ``labels``: row key -> (label, kind); ``ref_labels``: row key -> its ratio's reference.
    """
    head = ("| method | kind | held-out nRMSE | held-out ÷ ens. | held-out MAE | "
            "train nRMSE | train ÷ ens. | train MAE |")
    lines = [head, "|" + "---|" * 8]
    for key, (label, kind) in labels.items():
        if key not in summary:
            continue
        s = summary[key]
        lines.append(f"| {label} | {kind} | {_cell(s, 'heldout', 'nrmse')} | "
                     f"{_cell(s, 'heldout', 'ratio')} | {_cell(s, 'heldout', 'mae')} | "
                     f"{_cell(s, 'train', 'nrmse')} | {_cell(s, 'train', 'ratio')} | "
                     f"{_cell(s, 'train', 'mae')} |")
    refs = sorted(set(ref_labels.values()))
    lines.append("")
    lines.append("÷ ens.: the row's mean nRMSE divided by that of " + " / ".join(refs) +
                 " (same family), both means over the same seeds and sensors.")
    return "\n".join(lines)


def sensor_table(summary: dict[str, Any], labels: dict[str, tuple[str, str]],
                 sensors: Sequence[str], group: str = "heldout") -> str:
    """nRMSE per sensor of ``group`` (mean over seeds), one line per row."""
    lines = ["| method | " + " | ".join(sensors) + " |", "|" + "---|" * (len(sensors) + 1)]
    for key, (label, _) in labels.items():
        g = summary.get(key, {}).get(group) or {}
        if not g:
            continue
        cells = " | ".join(f"{g['per_sensor'][s]['nrmse']:.3f}" for s in sensors)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def cost_table(secagg: dict[str, dict[str, Any]], labels: dict[str, tuple[str, str]]) -> str:
    """Per secagg row: wall seconds, encrypted steps, wire MB (means over seeds), auto's choice."""
    lines = ["| method | seconds | encrypted steps | wire MB | chosen (auto) |",
             "|---|---|---|---|---|"]
    for key, runs in secagg.items():
        if not runs:
            continue
        secs = np.mean([r["seconds"] for r in runs])
        steps = np.mean([len(r["steps"]) for r in runs])
        wire = np.mean([r["wire_bytes"] for r in runs]) / 1e6
        chosen = ", ".join(str(r["chosen"]["chosen"]) for r in runs if r["chosen"].get("chosen"))
        lines.append(f"| {labels[key][0]} | {secs:.1f} | {steps:.0f} | {wire:.2f} | "
                     f"{chosen or '—'} |")
    return "\n".join(lines)


# ── plot ───────────────────────────────────────────────────────────────────────────────────


def plot(summary: dict[str, Any], labels: dict[str, tuple[str, str]], sensors: Sequence[str],
         refs: dict[str, str], path: Path, title: str) -> Path:
    """Held-out sensors' nRMSE per row: one marker per sensor, a bar at the mean, a dashed line
    at each family's ensemble."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in labels if (summary.get(k, {}).get("heldout") or {})]
    fig, ax = plt.subplots(figsize=(12, 0.36 * len(keys) + 1.8))
    colors = plt.get_cmap("tab10")
    values = []
    for row, key in enumerate(keys):
        g = summary[key]["heldout"]
        y = len(keys) - 1 - row
        for j, s in enumerate(sensors):
            v = g["per_sensor"][s]["nrmse"]
            values.append(v)
            ax.scatter(v, y, color=colors(j % 10), s=22, zorder=3,
                       label=s if row == 0 else None)
        ax.plot([g["nrmse"]] * 2, [y - 0.35, y + 0.35], color="black", lw=2, zorder=4)
    for ref in sorted({refs[k] for k in keys if refs[k] in keys}):
        ax.axvline(summary[ref]["heldout"]["nrmse"], color="grey", ls="--", lw=1, zorder=1)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([labels[k][0] for k in reversed(keys)], fontsize=8)
    if values and max(values) > 4 * min(values):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("nRMSE on held-out sensors, each in its own normalized space "
                  "(bar: mean over sensors; dashed: output ensembles)", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="held-out sensor",
              title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
