"""Fold accuracy results written on another machine into the results file, and re-plot.

    python -m sglang_sawint4.eval.merge /path/from/gpu/accuracy_gpu.json --out bench/results/accuracy.json

The GPU host writes its own file (scripts/gpu_run.sh long-acc / gsm); its rows replace
the rows of the same (model, method, block, rotate, context or task), its run records are
added per model.
"""

from __future__ import annotations

import argparse
import os

from sglang_sawint4.eval.perplexity import plot, plot_policy
from sglang_sawint4.eval.results import load_results, merge_results, save_results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="results file to fold in")
    p.add_argument("--out", required=True, help="the results file (updated in place)")
    args = p.parse_args()
    if not os.path.exists(args.source):
        raise SystemExit(f"{args.source}: no such file")
    other = load_results(args.source)
    result = merge_results(load_results(args.out), other)
    save_results(args.out, result)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    plot_policy(result, os.path.join(os.path.dirname(args.out) or ".", "policy_accuracy.png"))
    print(f"{len(other['rows'])} rows from {args.source} merged into {args.out} ({len(result['rows'])} rows)")


if __name__ == "__main__":
    main()
