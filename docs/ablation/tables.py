#!/usr/bin/env python3
"""The tables of docs/ablation.md from the `stats.json` that `acrf report` writes for each sweep of run.sh.

Usage: tables.py DIR  (DIR as given to run.sh; reads DIR/report-<sweep>/stats.json, prints markdown).
Standard library only. Every statistic is computed by `acrf report` (coordinator/src/stats.rs); this script
only picks and formats them, beside the report's own numbers.
"""

import json
import sys
from pathlib import Path

# The tenth epoch (metrics count epochs from 0).
EPOCH = 9


def load(root, sweep):
    path = Path(root) / f"report-{sweep}" / "stats.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def pm(m, scale=1.0, digits=4):
    if not m:
        return "–"
    if m["n"] > 1:
        return f"{m['mean'] * scale:.{digits}f} ± {m['std'] * scale:.{digits}f}"
    return f"{m['mean'] * scale:.{digits}f}"


def setting(group, key):
    return dict(group["settings"]).get(key)


def epoch_of(group, epoch=EPOCH):
    for e, m in group["epochs"]:
        if e == epoch:
            return m
    return None


def within_epoch_std(stats, group, epoch=EPOCH):
    """The std of the step loss inside the epoch, averaged over the group's seeds."""
    by_name = {r["name"]: r["stats"] for r in stats["runs"]}
    stds = []
    for name in group["runs"]:
        for e, m in by_name[name]["epochs"]:
            if e == epoch:
                stds.append(m["std"])
    return f"{sum(stds) / len(stds):.4f}" if stds else "–"


def row(cells):
    return "| " + " | ".join(cells) + " |"


def table(header, rows):
    out = [row(header), row(["---"] * len(header))]
    out += [row(r) for r in rows]
    return "\n".join(out)


def common_columns(stats, g):
    return [
        pm(epoch_of(g)),
        within_epoch_std(stats, g),
        pm(g["final_eval"]),
        pm(g["loss_var"], digits=6),
        pm(g["loss_cv"], digits=3),
        pm(g["sample_loss_var"], digits=4),
        pm(g["grad_norm_var"], digits=6),
    ]


COMMON = [
    "10th-epoch step loss (seeds)",
    "its std within the epoch",
    "final eval loss",
    "var of step loss (last 25%)",
    "CV of step loss",
    "var of per-sample loss",
    "var of grad norm",
]


def sampling(root):
    stats = load(root, "sampling")
    if not stats:
        return "(sampling sweep not run)"
    jitter = load(root, "jitter")
    report = {"uniform": "0.28 ± 0.12", "anchor": "0.18 ± 0.03 (full AC-RF)"}
    rows = []
    for g in stats["groups"]:
        mode = setting(g, "acrf.timestep_sampling")
        n = 2 * int(setting(g, "training.gradient_accumulation"))
        rows.append([f"{mode}, N = {n}", report[mode] if n == 8 else ""] + common_columns(stats, g))
    if jitter:
        for g in jitter["groups"]:
            if float(setting(g, "acrf.jitter_scale")) == 0:
                rows.append(["anchor without jitter, N = 8", "0.22 ± 0.05 (anchor sampling)"] + common_columns(jitter, g))
    return table(["σ sampling", "report (epoch 10)"] + COMMON, rows)


def ratios(root):
    stats = load(root, "sampling")
    if not stats:
        return ""
    by = {(setting(g, "acrf.timestep_sampling"), setting(g, "training.gradient_accumulation")): g for g in stats["groups"]}
    rows = []
    for acc in ("4", "5"):
        a, u = by.get(("anchor", acc)), by.get(("uniform", acc))
        if not (a and u):
            continue
        r = lambda key: f"{a[key]['mean'] / u[key]['mean']:.3f}" if a[key] and u[key] and u[key]["mean"] else "–"
        rows.append([f"N = {2 * int(acc)}", r("loss_var"), r("loss_cv"), r("sample_loss_var"), r("grad_norm_var")])
    return table(
        ["slots per step", "var of step loss", "CV of step loss", "var of per-sample loss", "var of grad norm"], rows
    )


def simple(root, sweep, key, label, report):
    stats = load(root, sweep)
    if not stats:
        return f"({sweep} sweep not run)"
    rows = []
    for g in stats["groups"]:
        v = setting(g, key)
        rows.append([f"{label} = {v}", report.get(v, "")] + common_columns(stats, g))
    return table([label, "report"] + COMMON, rows)


MODULES = [
    ("attention.to_q", "to_q", "18.2"),
    ("attention.to_k", "to_k", "17.5"),
    ("attention.to_v", "to_v", "19.8"),
    ("attention.to_out.0", "to_out", "15.3"),
    ("feed_forward.w1", "ffn.w1", "12.1"),
    ("feed_forward.w2", "ffn.w2", "9.8"),
    ("feed_forward.w3", "ffn.w3", "(7.3 left)"),
]


def shares(root):
    stats = load(root, "k")
    if not stats:
        return "(k sweep not run)"
    g = next(g for g in stats["groups"] if setting(g, "acrf.turbo_steps") == "10")
    rows = [[name, rep, pm(g["module_shares"].get(key), 100.0, 1)] for key, name, rep in MODULES]
    return table(["module", "report %", "measured % (K = 10, 3 seeds)"], rows)


def main():
    root = sys.argv[1]
    print("### Table 8.4: σ sampling\n")
    print(sampling(root))
    print("\n### The variance claim: anchor ÷ uniform\n")
    print(ratios(root))
    print("\n### Jitter\n")
    print(simple(root, "jitter", "acrf.jitter_scale", "η", {}))
    print("\n### Table 9.1: K\n")
    print(simple(root, "k", "acrf.turbo_steps", "K", {"4": "0.22", "10": "0.18", "20": "0.16"}))
    print("\n### Table 9.2: Min-SNR γ\n")
    print(simple(root, "gamma", "acrf.snr_gamma", "γ", {}))
    print("\n### Loss modes\n")
    print(simple(root, "modes", "loss.loss_mode", "mode", {}))
    print("\n### Table 5.2: gradient norm share per module\n")
    print(shares(root))


if __name__ == "__main__":
    main()
