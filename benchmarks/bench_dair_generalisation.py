"""Strong generalisation, AIR against DAIR: count accuracy on digit counts never seen in training.

Eslami et al. 2016, multi-MNIST experiments, "Strong generalization": trained on scenes of 0, 1 or 2 digits and
tested on 3 digits (extrapolation), AIR is near 0% and DAIR about 80%; trained on 0, 1 or 3 and tested on 2
(interpolation), AIR about 60% and DAIR about 95% (approximate: read off the paper's figure). The issue's targets
for DAIR: at least 85% and 97%.

Each (task, model, seed) is one run of `inverse_graphics.train.train` (the `inverse-graphics train air|dair` code)
for --minutes of training wall-clock (periodic evaluation excluded) or --steps, with T = --max-steps inference steps
(4 for both tasks, so the model, not the step cap, must stop at the right count). The periodic evaluation inside
training scores the test count (a learning curve only: the final model is reported, nothing is selected on it).
The final model is scored on --test-n scenes of the test count and on --test-n scenes of the training counts
(in-distribution), both composed from MNIST test digits. Overlaps: Pyro's rejection rule by default (`--overlap`).
With --search-steps N > 0, the first --search-n test scenes are also counted by `inverse_graphics.count_search`
(every count hypothesis refined for N Adam steps and scored by its importance-weighted bound under the model: the
model chooses the count, not only the guide); that score is a separate column, beside the guide's on the same scenes.
Prints the table and writes it with its figures via benchmarks.common.write_results (to --out).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, markdown_table, write_results  # noqa: E402
from inverse_graphics.checkpoint import CHECKPOINT_NAME  # noqa: E402
from inverse_graphics.count_search import CountSearchConfig, search_counts  # noqa: E402
from inverse_graphics.evaluate import count_accuracy  # noqa: E402
from inverse_graphics.figures import attention_figure, curve_figure, read_metrics  # noqa: E402
from inverse_graphics.pretrained import load  # noqa: E402
from inverse_graphics.train import EVAL_SEED, TrainConfig, train  # noqa: E402
from scenes import mnist, multi_mnist  # noqa: E402


@dataclass(frozen=True)
class Task:
    """One generalisation test: train on some digit counts, test on another."""

    train_counts: tuple[int, ...]
    test_counts: tuple[int, ...]
    paper: dict  # model -> count accuracy the paper reports on the test count (approximate, read off its figure)
    target: float  # the target for DAIR


# --models choice -> table name. dair-sleep: DAIR trained with the sleep phase too (train.TrainConfig.sleep_weight).
MODELS = {"air": "AIR", "dair": "DAIR", "dair-memory": "DAIR (memory)", "dair-sleep": "DAIR + sleep"}


def kind(model: str) -> str:
    """The `train` model (and the paper's row) behind a --models choice: "air" or "dair"."""
    return "air" if model == "air" else "dair"


TASKS = {
    "extrapolation": Task((0, 1, 2), (3,), {"air": 0.0, "dair": 0.8}, 0.85),
    "interpolation": Task((0, 1, 3), (2,), {"air": 0.6, "dair": 0.95}, 0.97),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    p.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=["air", "dair"],
        help="dair-memory: DAIR whose steps also see the recurrent state (the variant before memoryless DAIR became "
        "the default); dair-sleep: DAIR whose guide also learns from scenes the model dreams, with 0..T objects",
    )
    p.add_argument("--sleep-weight", type=float, default=1.0, help="dair-sleep's weight of the sleep loss")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-clock per run")
    p.add_argument("--steps", type=int, default=None, help="step budget instead (smoke runs)")
    p.add_argument("--max-steps", type=int, default=4, help="T, inference steps")
    p.add_argument("--n-train", type=int, default=60_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="the main learning rate at step 0 (train.lr_at)")
    p.add_argument(
        "--lr-floor", type=float, default=TrainConfig.lr_floor, help="the main learning rate's floor (train.lr_at)"
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="runs laid out like --runs: each run starts from the weights of its namesake there "
        "(<task>/<model>_seed<seed>/checkpoint.safetensors; fresh optimiser, step count and schedule), to train it "
        "on further, e.g. on a GPU",
    )
    p.add_argument("--eval-n", type=int, default=1000, help="test-count scenes for the learning curve")
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds of training between evaluations")
    p.add_argument("--test-n", type=int, default=10_000, help="scenes for each final score")
    p.add_argument("--overlap", choices=multi_mnist.OVERLAP_RULES, default="reject")
    p.add_argument(
        "--search-steps", type=int, default=0, help="count search (count_search.py): Adam steps per hypothesis; 0: off"
    )
    p.add_argument("--search-n", type=int, default=1000, help="test scenes (the first ones) for the count search")
    p.add_argument("--search-models", nargs="+", choices=list(MODELS), default=["dair"], help="models to search with")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="MNIST location")
    p.add_argument("--runs", default="runs/bench_dair_generalisation", help="training run directories")
    p.add_argument("--name", default="dair_generalisation")
    p.add_argument("--out", default=str(RESULTS), help="where the table and figures go")
    p.add_argument(
        "--resume", action="store_true", help="reuse runs that finished; continue interrupted ones up to --minutes"
    )
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="with --resume: leave (model, seed) pairs that have no run out of the table instead of training them",
    )
    return p.parse_args(argv)


def held_out(digits: mnist.Digits, counts: tuple[int, ...], args) -> multi_mnist.MultiMnist:
    """--test-n scenes of MNIST test digits with these counts, the same for every model."""
    return multi_mnist.generate(digits, args.test_n, np.random.default_rng(EVAL_SEED), counts, overlap=args.overlap)


def run_one(task: Task, model: str, seed: int, run: Path, tests: dict, args) -> dict:
    """Train one model on one task (or reuse a finished run) and score it; returns its result record."""
    done = run / "final.json"
    if args.resume and done.exists():
        return json.loads(done.read_text())
    cfg = TrainConfig(
        model=kind(model),
        out_dir=str(run),
        seed=seed,
        minutes=args.minutes,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_floor=args.lr_floor,
        n_train=args.n_train,
        train_counts=task.train_counts,
        eval_counts=task.test_counts,
        max_steps=args.max_steps,
        overlap=args.overlap,
        eval_n=args.eval_n,
        eval_every_s=args.eval_every,
        data_dir=args.data_dir,
        device=args.device,
        threads=args.threads,
        dair_memory=model == "dair-memory",
        sleep_weight=args.sleep_weight if model == "dair-sleep" else 0.0,
        init_from=str(Path(args.init_from) / run.parent.name / run.name / CHECKPOINT_NAME) if args.init_from else None,
    )
    interrupted = args.resume and (run / CHECKPOINT_NAME).exists()  # killed before its score: continue it
    # not interrupted: a fresh run (overwrite), whose curve must not mix with an older one
    train(cfg, resume=interrupted, progress=False, overwrite=not interrupted)
    net = load(run / CHECKPOINT_NAME, device=args.device)
    test = count_accuracy(net, tests["test"], args.device)
    seen = count_accuracy(net, tests["train"], args.device)
    records = read_metrics(run / "metrics.jsonl")
    result = {
        "model": model,
        "seed": seed,
        "test_count_acc": test["count_acc"],
        "test_confusion": test["confusion"],
        "train_counts_acc": seen["count_acc"],
        "train_counts_per_count": seen["per_count"],
        "steps": max(r["step"] for r in records),
        "train_time_s": max(r["train_time_s"] for r in records),
    }
    done.write_text(json.dumps(result))
    return json.loads(done.read_text())  # the same record (string keys) whether fresh or resumed


def add_search(record: dict, run: Path, test: multi_mnist.MultiMnist, args) -> dict:
    """Score the run's model with the count search on the first --search-n test scenes (once per setting: the
    result is kept in the run's final.json) and add it to the record."""
    search = CountSearchConfig(steps=args.search_steps)
    settings = {
        "search_steps": search.steps,
        "search_n": min(args.search_n, len(test)),
        "search_deletion": search.deletion,
    }
    if all(record.get(k) == v for k, v in settings.items()):
        return record
    net = load(run / CHECKPOINT_NAME, device=args.device)
    n = settings["search_n"]
    x = torch.from_numpy(test.float_images(0, n))
    start = time.perf_counter()
    found = search_counts(
        net,
        x,
        search,
        progress=lambda done, total: print(f"  count search {run.name}: {done}/{total} scenes", flush=True),
    )
    truth = test.counts[:n]
    counts, guide = found.counts.cpu().numpy(), found.guide_counts.cpu().numpy()
    record.update(
        settings,
        search_acc=float((counts == truth).mean()),
        search_guide_acc=float((guide == truth).mean()),
        search_confusion={
            f"{t}->{p}": int(((truth == t) & (counts == p)).sum()) for t in np.unique(truth) for p in np.unique(counts)
        },
        search_seconds=round(time.perf_counter() - start, 1),
    )
    (run / "final.json").write_text(json.dumps(record))
    return record


def failures_figure(net, test: multi_mnist.MultiMnist, path: Path, n: int = 8, pool: int = 1000) -> Path | None:
    """The first n test scenes (of the first `pool`) whose count the model gets wrong, with its attention windows
    and reconstructions: what the errors look like (None if it gets all of them right)."""
    x = torch.from_numpy(test.float_images(0, pool))
    wrong = (net.infer(x).counts.cpu().numpy() != test.counts[:pool]).nonzero()[0][:n]
    if len(wrong) == 0:
        return None
    shown = x[wrong]
    return attention_figure(shown, net.infer(shown, reconstruct=True), path, truth=test.counts[wrong])


def bar_figure(results: dict[str, list[dict]], path: Path) -> Path:
    """Test-count accuracy per task and model (bars: median over seeds) beside the paper's (markers)."""
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    searched_shown = False
    colours = {"air": "tab:blue", "dair": "tab:orange", "dair-memory": "tab:green", "dair-sleep": "tab:red"}
    for i, (task, rows) in enumerate(results.items()):
        models = [m for m in MODELS if any(r["model"] == m for r in rows)]
        width = 0.8 / len(models)
        for j, model in enumerate(models):
            acc = np.median([r["test_count_acc"] for r in rows if r["model"] == model])
            x = i + (j - (len(models) - 1) / 2) * width
            ax.bar(x, acc, width, color=colours[model], label=MODELS[model] if i == 0 else None)
            paper = TASKS[task].paper[kind(model)]
            ax.plot(x, paper, "k_", ms=18, mew=2, label="paper" if i == j == 0 else None)
            searched = [r["search_acc"] for r in rows if r["model"] == model and "search_acc" in r]
            if searched:
                ax.plot(x, np.median(searched), "kD", ms=5, label="with count search" if not searched_shown else None)
                searched_shown = True
    ax.set_xticks(range(len(results)), [f"{t}\n(test on {TASKS[t].test_counts[0]})" for t in results])
    ax.set_ylabel("count accuracy on the unseen count")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def medians(recs: list[dict]) -> list[dict]:
    """One summary record per model that has several seeds: the median of each accuracy (seed "median of n")."""
    out = []
    for model in dict.fromkeys(r["model"] for r in recs):
        mine = [r for r in recs if r["model"] == model]
        if len(mine) > 1:
            keys = ["test_count_acc", "train_counts_acc"] + ["search_acc"] * all("search_acc" in r for r in mine)
            med = {k: float(np.median([r[k] for r in mine])) for k in keys}
            out.append({"model": model, "seed": f"median of {len(mine)}", **med, "steps": "-"})
    return out


def search_cell(r: dict) -> str:
    if "search_acc" not in r:
        return "-"
    if "search_guide_acc" not in r:  # a median row
        return f"{r['search_acc']:.1%}"
    return f"{r['search_acc']:.1%} ({r['search_guide_acc']:.1%}; {r['search_n']} scenes, {r['search_steps']} steps)"


def table(results: dict[str, list[dict]], args) -> str:
    rows = []
    for task, recs in results.items():
        t = TASKS[task]
        for r in recs + medians(recs):
            target = f">= {t.target:.0%}" if kind(r["model"]) == "dair" else "-"
            rows.append(
                [
                    task,
                    ",".join(map(str, t.train_counts)),
                    t.test_counts[0],
                    MODELS[r["model"]],
                    r["seed"],
                    f"{r['test_count_acc']:.1%}",
                    search_cell(r),
                    f"~{t.paper[kind(r['model'])]:.0%}",
                    target,
                    f"{r['train_counts_acc']:.1%}",
                    r["steps"],
                    f"{r['train_time_s'] / 60:.1f}" if "train_time_s" in r else "-",
                ]
            )
    header = ["task", "train counts", "test count", "model", "seed", f"count acc ({args.test_n} test scenes)"]
    header += ["with count search (guide on the same scenes)"]
    header += ["paper", "target", "acc on train counts", "steps", "train min"]
    where = ", ".join(sorted({r["trained_on"] for recs in results.values() for r in recs if "trained_on" in r}))
    budget = f"{args.minutes:g} minutes of training wall-clock (evaluation excluded)"
    if args.steps is not None:
        budget = f"{args.steps} steps (or {args.minutes:g} minutes, whichever ended first)"
    if args.init_from:
        budget += (
            f" on top of the runs under {args.init_from} (their weights, a fresh optimiser and learning-rate schedule;"
            " the steps and train min columns count this training only)"
        )
    if args.resume:
        budget += " (runs reused by --resume keep the budget and settings they were trained with: train min column)"
    return (
        markdown_table(header, rows) + f"\n\nBudget: each run trained for at most {budget}, batch "
        f"{args.batch_size}, learning rate {args.lr:g} decaying to {args.lr_floor:g}, T = {args.max_steps} steps, "
        f"{args.n_train} training scenes, overlap rule '{args.overlap}', trained on {where or args.device}. Paper "
        "numbers are approximate, read off Eslami et al. 2016.\n\n"
        f"![accuracy]({args.name}.png)\n\n![curves]({args.name}_curve.png)"
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    digits = mnist.load_digits("test", args.data_dir)
    results: dict[str, list[dict]] = {}
    curves = {}
    for name in args.tasks:
        task = TASKS[name]
        tests = {"test": held_out(digits, task.test_counts, args), "train": held_out(digits, task.train_counts, args)}
        results[name] = []
        for model in args.models:
            for seed in args.seeds:
                run = Path(args.runs) / name / f"{model}_seed{seed}"
                if args.resume and args.skip_missing and not (run / CHECKPOINT_NAME).exists():
                    continue
                results[name].append(run_one(task, model, seed, run, tests, args))
                # where it trained, from the run's own config: a run reused by --resume may have trained elsewhere
                results[name][-1]["trained_on"] = json.loads((run / "config.json").read_text())["device"]
                if args.search_steps and model in args.search_models:
                    results[name][-1] = add_search(results[name][-1], run, tests["test"], args)
                curves[f"{name} {model} seed {seed}"] = read_metrics(run / "metrics.jsonl")
                net = load(run / CHECKPOINT_NAME)
                stem = out / f"{args.name}_{name}_{model}_seed{seed}"
                x = torch.from_numpy(tests["test"].float_images(0, 8))
                attention_figure(
                    x, net.infer(x, reconstruct=True), f"{stem}_attention.png", truth=tests["test"].counts[:8]
                )
                failures_figure(net, tests["test"], Path(f"{stem}_failures.png"))
                print(name, model, seed, f"{results[name][-1]['test_count_acc']:.1%}", flush=True)
    bar_figure(results, out / f"{args.name}.png")
    curve_figure(curves, out / f"{args.name}_curve.png", thresholds=(0.85, 0.97))
    record = {"budget_minutes": args.minutes, "budget_steps": args.steps, "results": results, "args": vars(args)}
    write_results(args.name, record, table(results, args), out)
    return results


if __name__ == "__main__":
    main()
