#!/usr/bin/env python3
"""Storage formats against float in the LM demo (issue 24, item 4): adamw, galore and adarank,
each trained in float and with one or more variants of one configuration key — `state=8bit`
(8-bit blockwise moments, the default variant), `weights=bf16` (bf16 weights with stochastic
rounding), `weights=bf16-nearest` (bf16 weights rounded to nearest), `basis=int8`, ... — once per
seed (the same seed draws the same initial weights and batches for every configuration, so the
runs are paired), then per method and variant the paired difference of the final validation
loss (variant minus float): its mean, sample standard deviation, minimum and maximum over the
seeds, and the peak optimizer state's ratio.

Each seed is one `lm_train` call (the configurations in their own processes, one after another)
whose --json is kept in --out; the table is printed in Markdown and written to --out/table.md.
The learning rates are lm_train's defaults (or --lr / --lr-low-rank passed through): every format
of a method gets the same one, so a difference is the format's alone.

usage: format_study.py --trainer build/examples/lm_train [--variant state=8bit ...] [--seeds 1,2,3]
                       [--out DIR] [--reuse] [lm_train flags...]
(--variant: a configuration key=value appended as ':key=value', repeatable; --reuse: a seed whose
JSON is already in --out is read, not trained again)
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys

METHODS = ["adamw", "galore", "adarank"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", required=True, help="the lm_train executable")
    ap.add_argument("--variant", action="append", help="a configuration key=value compared with float (repeatable; default state=8bit)")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (at least 2)")
    ap.add_argument("--out", default="format-study", help="directory for the per-seed JSON and the table")
    ap.add_argument("--reuse", action="store_true", help="read a seed's JSON from --out if it is there instead of training")
    args, passthrough = ap.parse_known_args()
    variants = args.variant or ["state=8bit"]
    for v in variants:
        key, sep, value = v.partition("=")
        if not sep or not key or not value or ":" in v or "," in v:
            sys.exit(f"format_study.py: --variant takes one configuration key=value (e.g. weights=bf16), got '{v}'")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if len(seeds) < 2:
        sys.exit("format_study.py: at least two seeds (an accuracy claim from one seed is not one)")
    if any(f in passthrough for f in ("--configs", "--config", "--seed", "--json", "--study")):
        sys.exit("format_study.py: --configs, --seed, --json and --study are chosen by the study")
    os.makedirs(args.out, exist_ok=True)
    configs = [c for m in METHODS for c in [m] + [f"{m}:{v}" for v in variants]]
    loss = {}    # (config, seed) -> final validation loss
    state = {}   # (config, seed) -> peak optimizer bytes (AdaRankGrad's depends on the seed)
    for seed in seeds:
        path = os.path.join(args.out, f"seed{seed}.json")
        cmd = [args.trainer, *passthrough, "--configs", ",".join(configs), "--seed", str(seed), "--json", path]
        if args.reuse and os.path.exists(path):
            print("reusing", path, flush=True)
        else:
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            for run in json.load(f)["runs"]:
                if run["error"] or run["interrupted"]:
                    sys.exit(f"format_study.py: {run['name']} seed {seed}: {run['error'] or 'interrupted'}")
                loss[(run["name"], seed)] = run["valid_loss"]
                state[(run["name"], seed)] = run["peak_optimizer_bytes"]
    missing = [(c, s) for c in configs for s in seeds if (c, s) not in loss]
    if missing:
        sys.exit(f"format_study.py: no run named {missing[0][0]} for seed {missing[0][1]} in its JSON")
    ms = lambda v: f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}"
    lines = ["| method | variant | val loss, float (mean ± sd) | val loss, variant (mean ± sd) | paired diff variant − float: mean ± sd | min | max | peak optimizer state variant / float (mean) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        f = [loss[(m, s)] for s in seeds]
        for v in variants:
            q = [loss[(f"{m}:{v}", s)] for s in seeds]
            d = [b - a for a, b in zip(f, q)]
            ratio = statistics.mean(state[(f"{m}:{v}", s)] / state[(m, s)] for s in seeds)
            lines.append(f"| {m} | {v} | {ms(f)} | {ms(q)} | {statistics.mean(d):+.4f} ± {statistics.stdev(d):.4f} | {min(d):+.4f} | {max(d):+.4f} | {ratio:.3f} |")
    lines.append(f"(seeds {','.join(map(str, seeds))}; loss: final validation loss in nats per byte; sd: sample standard deviation over the seeds)")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    return 0 if all(math.isfinite(v) for v in loss.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
