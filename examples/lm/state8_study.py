#!/usr/bin/env python3
"""8-bit against 32-bit optimizer state in the LM demo (issue 24, item 4): adamw, galore and
adarank, each with float moments and with `:state=8bit`, trained by `lm_train` once per seed
(the same seed draws the same initial weights and batches for every configuration, so the runs
are paired), then the paired difference of the final validation loss (8-bit minus float) per
method: its mean, sample standard deviation, minimum and maximum over the seeds.

Each seed is one `lm_train` call (the configurations in their own processes, one after another)
whose --json is kept in --out; the table is printed in Markdown and written to --out/table.md.
The learning rates are lm_train's defaults (or --lr / --lr-low-rank passed through): both
formats of a method get the same one, so the difference is the state's alone.

usage: state8_study.py --trainer build/examples/lm_train [--seeds 1,2,3] [--out DIR] [--reuse] [lm_train flags...]
(--reuse: a seed whose JSON is already in --out is read, not trained again)
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
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (at least 2)")
    ap.add_argument("--out", default="state8-study", help="directory for the per-seed JSON and the table")
    ap.add_argument("--reuse", action="store_true", help="read a seed's JSON from --out if it is there instead of training")
    args, passthrough = ap.parse_known_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if len(seeds) < 2:
        sys.exit("state8_study.py: at least two seeds (an accuracy claim from one seed is not one)")
    if any(f in passthrough for f in ("--configs", "--config", "--seed", "--json", "--study")):
        sys.exit("state8_study.py: --configs, --seed, --json and --study are chosen by the study")
    os.makedirs(args.out, exist_ok=True)
    configs = [c for m in METHODS for c in (m, m + ":state=8bit")]
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
                    sys.exit(f"state8_study.py: {run['name']} seed {seed}: {run['error'] or 'interrupted'}")
                loss[(run["name"], seed)] = run["valid_loss"]
                state[(run["name"], seed)] = run["peak_optimizer_bytes"]
    lines = ["| method | val loss, float (mean ± sd) | val loss, 8-bit (mean ± sd) | paired diff 8-bit − float: mean ± sd | min | max | peak optimizer state 8-bit / float (mean) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        f = [loss[(m, s)] for s in seeds]
        q = [loss[(m + ":state=8bit", s)] for s in seeds]
        d = [b - a for a, b in zip(f, q)]
        ms = lambda v: f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}"
        ratio = statistics.mean(state[(m + ":state=8bit", s)] / state[(m, s)] for s in seeds)
        lines.append(f"| {m} | {ms(f)} | {ms(q)} | {statistics.mean(d):+.4f} ± {statistics.stdev(d):.4f} | {min(d):+.4f} | {max(d):+.4f} | {ratio:.3f} |")
    lines.append(f"(seeds {','.join(map(str, seeds))}; loss: final validation loss in nats per byte; sd: sample standard deviation over the seeds)")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    return 0 if all(math.isfinite(v) for v in loss.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
