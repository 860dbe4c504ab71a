"""AIR training on multi-MNIST: reliability across seeds, time to 95% / 98% count accuracy, the learning curve.

Trains one run per seed with `inverse-graphics train air` (the same `train` function), each for --minutes of
training wall-clock (periodic evaluation excluded). Time-to-X is the training time at the first periodic
evaluation (on --eval-n held-out scenes of MNIST test digits) at or above X; each run's final model is then scored
on 10,000 held-out scenes. Prints the per-seed table, saves it with the curve figure in benchmarks/results/.

Data: by default Pyro's generator exactly (`--overlap reject`: scenes whose summed ink exceeds 255 are redrawn), the
recipe behind the numbers the targets compare to; each final model is also scored on DESIGN.md's clipped-overlap
scenes, where ~20% of two-digit scenes are pairs whose centres lie within 8 px and counting is often ambiguous.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, markdown_table, write_results
from inverse_graphics.checkpoint import CHECKPOINT_NAME
from inverse_graphics.evaluate import count_accuracy
from inverse_graphics.figures import curve_figure, read_metrics
from inverse_graphics.pretrained import load
from inverse_graphics.train import TrainConfig, train
from scenes import mnist, multi_mnist


def time_to(records: list[dict], threshold: float) -> float | None:
    for r in records:
        if r.get("kind") == "eval" and r["count_acc"] >= threshold:
            return r["train_time_s"]
    return None


def fmt_time(seconds: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=None, help="step budget instead (smoke runs)")
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--eval-every", type=float, default=15.0, help="seconds of training between evaluations")
    p.add_argument("--final-n", type=int, default=10_000, help="held-out scenes for each run's final score")
    p.add_argument("--runs", default="runs/bench_air_training")
    p.add_argument("--n-train", type=int, default=60_000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overlap", choices=multi_mnist.OVERLAP_RULES, default="reject", help="multi-MNIST overlap rule")
    p.add_argument("--name", default="air_training")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--resume", action="store_true", help="skip seeds whose run already finished")
    args = p.parse_args(argv)

    test_digits = mnist.load_digits("test")
    held_out = multi_mnist.generate(test_digits, args.final_n, np.random.default_rng(2016), overlap=args.overlap)
    other = "clip" if args.overlap == "reject" else "reject"
    held_out_other = multi_mnist.generate(test_digits, args.final_n, np.random.default_rng(2016), overlap=other)
    rows, per_seed, curves = [], [], {}
    for seed in args.seeds:
        run = Path(args.runs) / f"seed{seed}"
        done = run / "final.json"
        if args.resume and done.exists():
            result = json.loads(done.read_text())
        else:
            cfg = TrainConfig(
                out_dir=str(run),
                seed=seed,
                minutes=args.minutes,
                steps=args.steps,
                eval_n=args.eval_n,
                eval_every_s=args.eval_every,
                n_train=args.n_train,
                threads=args.threads,
                overlap=args.overlap,
            )
            train(cfg, progress=False, overwrite=True)  # a fresh run: its curve must not mix with an older one
            model = load(run / CHECKPOINT_NAME)
            final = count_accuracy(model, held_out)
            records = read_metrics(run / "metrics.jsonl")
            steps = max(r["step"] for r in records)
            result = {
                "seed": seed,
                "final_count_acc": final["count_acc"],
                "per_count": final["per_count"],
                f"final_count_acc_{other}": count_accuracy(model, held_out_other)["count_acc"],
                "time_to_95_s": time_to(records, 0.95),
                "time_to_98_s": time_to(records, 0.98),
                "train_time_s": max(r["train_time_s"] for r in records),
                "steps": steps,
            }
            done.write_text(json.dumps(result))
        per_seed.append(result)
        curves[f"seed {seed}"] = read_metrics(run / "metrics.jsonl")
        rows.append(
            [
                seed,
                f"{result['final_count_acc']:.2%}",
                f"{result[f'final_count_acc_{other}']:.2%}",
                fmt_time(result["time_to_95_s"]),
                fmt_time(result["time_to_98_s"]),
                result["steps"],
                "yes" if result["final_count_acc"] >= 0.95 else "no",
            ]
        )
        print(rows[-1], flush=True)
    out = Path(args.out)
    curve_figure(curves, out / f"{args.name}_curve.png")
    passed = sum(r["final_count_acc"] >= 0.95 for r in per_seed)
    t95 = [r["time_to_95_s"] for r in per_seed if r["time_to_95_s"] is not None]
    t98 = [r["time_to_98_s"] for r in per_seed if r["time_to_98_s"] is not None]
    summary = {
        "minutes_per_seed": args.minutes,
        "seeds_passing_95": passed,
        "n_seeds": len(per_seed),
        "median_time_to_95_s": statistics.median(t95) if t95 else None,
        "median_time_to_98_s": statistics.median(t98) if t98 else None,
        "median_final_count_acc": statistics.median(r["final_count_acc"] for r in per_seed),
    }
    table = markdown_table(
        [
            "seed",
            f"count acc ({args.final_n} held-out, {args.overlap})",
            f"count acc ({other})",
            "time to 95%",
            "time to 98%",
            "steps",
            ">= 95%",
        ],
        rows,
    )
    table += (
        f"\n\n{passed} of {len(per_seed)} seeds reach 95% within {args.minutes:g} minutes. Median time to 95%: "
        f"{fmt_time(summary['median_time_to_95_s'])} ({len(t95)} seeds reached it); to 98%: "
        f"{fmt_time(summary['median_time_to_98_s'])} ({len(t98)} seeds). Time-to-X from periodic evaluation "
        f"on {args.eval_n} held-out scenes every {args.eval_every:g} s of training. Training and held-out scenes "
        f"use overlap rule '{args.overlap}'; the '{other}' column scores the same final models on the other rule.\n\n"
        f"![curve]({args.name}_curve.png)"
    )
    write_results(args.name, {"summary": summary, "per_seed": per_seed}, table, out)
    return summary


if __name__ == "__main__":
    main()
