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
    """The stats of sweep `sweep`, and of `sweep-<part>` sweeps that trained some of its arms alongside."""
    paths = [Path(root) / f"report-{sweep}" / "stats.json"] + sorted(Path(root).glob(f"report-{sweep}-*/stats.json"))
    parts = [json.loads(p.read_text()) for p in paths if p.exists()]
    if not parts:
        return None
    return {"runs": [r for p in parts for r in p["runs"]], "groups": [g for p in parts for g in p["groups"]]}


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


def window_loss(g):
    """The step loss over the last 25%: mean ± the std within a run, both averaged over the seeds."""
    if not (g["loss"] and g["loss_var"]):
        return "–"
    return f"{g['loss']['mean']:.4f} ± {g['loss_var']['mean'] ** 0.5:.4f}"


def row(cells):
    return "| " + " | ".join(cells) + " |"


def table(header, rows):
    out = [row(header), row(["---"] * len(header))]
    out += [row(r) for r in rows]
    return "\n".join(out)


def common_columns(g):
    return [
        pm(epoch_of(g)),
        window_loss(g),
        pm(g["final_eval"]),
        pm(g["loss_var"], digits=6),
        pm(g["loss_cv"], digits=3),
        pm(g["sample_loss_var"], digits=4),
        pm(g["grad_norm_var"], digits=6),
    ]


COMMON = [
    "10th epoch (steps 19–20), over seeds",
    "step loss, last 25% (± within run)",
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
        rows.append([f"{mode}, N = {n}", report[mode] if n == 8 else ""] + common_columns(g))
    if jitter:
        for g in jitter["groups"]:
            if float(setting(g, "acrf.jitter_scale")) == 0:
                rows.append(["anchor without jitter, N = 8", "0.22 ± 0.05 (anchor sampling)"] + common_columns(g))
    return table(["σ sampling", "report (epoch 10)"] + COMMON, rows)


def ratios(root):
    """Each anchor arm's variances over uniform σ's at the same N, beside the theorem's 12·K·η²."""
    stats = load(root, "sampling")
    if not stats:
        return ""
    by = {(setting(g, "acrf.timestep_sampling"), setting(g, "training.gradient_accumulation")): g for g in stats["groups"]}
    arms = [("K = 10, η = 0.02, N = 8", by.get(("anchor", "4")), by.get(("uniform", "4")), 10, 0.02)]
    arms.append(("K = 10, η = 0.02, N = 10", by.get(("anchor", "5")), by.get(("uniform", "5")), 10, 0.02))
    for sweep, key, value, k, eta in [("k", "acrf.turbo_steps", "4", 4, 0.02), ("k", "acrf.turbo_steps", "20", 20, 0.02),
                                      ("jitter", "acrf.jitter_scale", "0", 10, 0.0)]:
        other = load(root, sweep)
        g = next((g for g in other["groups"] if setting(g, key) == value), None) if other else None
        if g:
            arms.append((f"K = {k}, η = {eta}, N = 8", g, by.get(("uniform", "4")), k, eta))
    rows = []
    for label, a, u, k, eta in arms:
        if not (a and u):
            continue
        r = lambda key: f"{a[key]['mean'] / u[key]['mean']:.3f}" if a[key] and u[key] and u[key]["mean"] else "–"
        rows.append([label, f"{12 * k * eta * eta:.3f}", r("loss_var"), r("loss_cv"), r("sample_loss_var"), r("grad_norm_var")])
    return table(
        ["anchor arm (vs uniform σ at the same N)", "theorem: 12Kη²", "var of step loss", "CV of step loss",
         "var of per-sample loss", "var of grad norm"],
        rows,
    )


def base_group(root):
    """The base job's seeds, trained once in the sampling sweep (anchor sampling, N = 8)."""
    stats = load(root, "sampling")
    if not stats:
        return None
    return next(
        g
        for g in stats["groups"]
        if setting(g, "acrf.timestep_sampling") == "anchor" and setting(g, "training.gradient_accumulation") == "4"
    )


def simple(root, sweep, key, label, report, base_value):
    stats = load(root, sweep)
    if not stats:
        return f"({sweep} sweep not run)"
    groups = [(setting(g, key), g) for g in stats["groups"]]
    base = base_group(root)
    if base:
        groups.append((base_value, base))
    rows = []
    for v, g in sorted(groups, key=lambda vg: sort_key(vg[0])):
        name = f"{label} = {v}" + (" (base job)" if g is base else "")
        rows.append([name, report.get(v, "")] + common_columns(g))
    return table([label, "report"] + COMMON, rows)


def sort_key(v):
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


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
    base = base_group(root)
    if not base:
        return "(sampling sweep not run)"
    uniform = load(root, "sampling")["groups"]
    uniform = next(g for g in uniform if setting(g, "acrf.timestep_sampling") == "uniform" and setting(g, "training.gradient_accumulation") == "4")
    rows = [
        [name, rep, pm(base["module_shares"].get(key), 100.0, 1), pm(uniform["module_shares"].get(key), 100.0, 1)]
        for key, name, rep in MODULES
    ]
    return table(["module", "report %", "measured %, base job", "measured %, uniform σ"], rows)


def main():
    root = sys.argv[1]
    print("### Table 8.4: σ sampling\n")
    print(sampling(root))
    print("\n### The variance claim: anchor ÷ uniform\n")
    print(ratios(root))
    print("\n### Jitter\n")
    print(simple(root, "jitter", "acrf.jitter_scale", "η", {}, "0.02"))
    print("\n### Table 9.1: K\n")
    print(simple(root, "k", "acrf.turbo_steps", "K", {"4": "0.22", "10": "0.18", "20": "0.16"}, "10"))
    print("\n### Table 9.2: Min-SNR γ\n")
    print(simple(root, "gamma", "acrf.snr_gamma", "γ", {}, "5"))
    print("\n### Loss modes\n")
    print(simple(root, "modes", "loss.loss_mode", "mode", {}, "standard"))
    print("\n### Table 5.2: gradient norm share per module\n")
    print(shares(root))


if __name__ == "__main__":
    main()
