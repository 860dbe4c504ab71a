"""AIR on Omniglot: up to 4 steps per character; the ELBO, the distribution of steps used, and step-by-step figures.

Eslami et al. 2016 also trained AIR on Omniglot and show it decomposing characters into stroke-like parts, one part
per step. Here: trained with `inverse_graphics.train.train` on the full background set (30 alphabets, 19,280 images)
and tested on the evaluation set (20 other alphabets, 13,180 images), read by `scenes.omniglot` at --canvas pixels
(50 by default: strokes stay ~2.4 px wide; see that module). Reported on the test set: the ELBO (nats per image,
averaged over --elbo-samples draws of the guide; a Gaussian pixel likelihood with sd 0.3 on [0, 1] intensities, so
not comparable to binarised-Omniglot likelihoods in the VAE literature), the fraction of characters explained with
0..T steps (the most probable count), and a figure of the canvas after each step. The same ELBO on background
characters is reported beside it, to show over-fitting.

Priors (deviations from the multi-MNIST defaults, flagged): the digit prior is tight around s = 0.43 (a digit's
size) and the count prior (rho = 0.01 per step) makes every extra part cost ~4.6 nats. On Omniglot that gave two
large parts per character (results/omniglot.md: 2 steps for 98.6% of characters, an upper-left and a lower-right
part; with smaller windows alone, a left and a right part, results/omniglot_small_parts.md). The defaults here are
smaller windows (median s 0.25, log-sd 0.3: --scale-prior, --scale-prior-sd) and rho = 0.5 (--z-pres-prior): 3-4
stroke-like parts per character and a higher test ELBO in half the time (results/omniglot_cheap_parts.md).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS, markdown_table, write_results  # noqa: E402
from inverse_graphics.air import AIR  # noqa: E402
from inverse_graphics.checkpoint import CHECKPOINT_NAME
from inverse_graphics.figures import STEP_COLOURS, read_metrics  # noqa: E402
from inverse_graphics.pretrained import load  # noqa: E402
from inverse_graphics.train import TrainConfig, train  # noqa: E402
from renderers.spatial_transformer import z_where_to_boxes  # noqa: E402
from scenes import omniglot  # noqa: E402

FIGURE_SEED = 7  # which test characters the figure shows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0, help="training wall-clock")
    p.add_argument("--steps", type=int, default=None, help="step budget instead (smoke runs)")
    p.add_argument("--max-steps", type=int, default=4, help="T, inference steps (the paper: up to 4)")
    p.add_argument("--canvas", type=int, default=omniglot.CANVAS_SIZE, help="image side, pixels")
    p.add_argument("--scale-prior", type=float, default=0.25, help="prior median of s (window side / canvas)")
    p.add_argument("--scale-prior-sd", type=float, default=0.3, help="prior sd of log s")
    p.add_argument("--z-pres-prior", type=float, default=0.5, help="prior probability of one more part")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-train", type=int, default=None, help="background images used (default: all)")
    p.add_argument("--eval-n", type=int, default=1000, help="evaluation images for the periodic ELBO")
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds of training between evaluations")
    p.add_argument("--test-n", type=int, default=None, help="evaluation images for the final scores (default: all)")
    p.add_argument("--elbo-samples", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="Omniglot location (<dir>/omniglot/...)")
    p.add_argument("--run", default="runs/bench_omniglot", help="training run directory")
    p.add_argument("--name", default="omniglot")
    p.add_argument("--out", default=str(RESULTS), help="where the table and figures go")
    return p.parse_args(argv)


def first(data: omniglot.Omniglot, n: int | None, seed: int) -> omniglot.Omniglot:
    """n images of `data` in a seeded random order (all of them, shuffled, for n = None)."""
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(order[:n])


def train_config(args) -> TrainConfig:
    scale = (math.log(args.scale_prior), 0.0, 0.0), (args.scale_prior_sd, 0.5, 0.5)
    return TrainConfig(
        model="air",
        out_dir=args.run,
        seed=args.seed,
        minutes=args.minutes,
        steps=args.steps,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        z_pres_prior=args.z_pres_prior,
        eval_every_s=args.eval_every,
        device=args.device,
        threads=args.threads,
        model_overrides={"canvas_size": args.canvas, "where_prior_loc": scale[0], "where_prior_scale": scale[1]},
    )


@torch.no_grad()
def mean_elbo(model: AIR, data: omniglot.Omniglot, samples: int, device: str, batch: int = 500) -> float:
    """The ELBO in nats per image, averaged over images and `samples` draws of the guide (eval mode: no updates)."""
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for start in range(0, len(data), batch):
            x = torch.from_numpy(data.float_images(start, start + batch)).to(device)
            total += sum(model.loss(x)[1]["elbo"] for _ in range(samples)) / samples * len(x)
    return total / len(data)


@torch.no_grad()
def steps_used(model: AIR, data: omniglot.Omniglot, device: str, batch: int = 1000) -> np.ndarray:
    """float (T + 1,): the fraction of images whose most probable count is 0, 1, ..., T."""
    counts = [
        model.infer(torch.from_numpy(data.float_images(s, s + batch)).to(device)).counts.cpu()
        for s in range(0, len(data), batch)
    ]
    return np.bincount(torch.cat(counts).numpy(), minlength=model.config.max_steps + 1) / len(data)


@torch.no_grad()
def step_figure(model: AIR, images: torch.Tensor, path: Path) -> Path:
    """Per character (rows): the input with each step's window, then the canvas after steps 1, 1-2, ..., 1-T.

    images: FloatTensor (n, H, W) in [0, 1]."""
    out = model.infer(images)
    n, T = out.z_pres.shape
    H, W = images.shape[1:]
    boxes = z_where_to_boxes(out.z_where, (H, W)).cpu().numpy()  # (n, T, 4) pixels
    canvas = torch.zeros_like(images)
    fig, axes = plt.subplots(n, T + 1, figsize=(1.4 * (T + 1), 1.4 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
    for t in range(T):
        canvas = canvas + model.render_step(out.z_pres[:, t], out.z_where[:, t], out.z_what[:, t])
        for i in range(n):
            axes[i, t + 1].imshow(canvas[i].cpu().clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            if out.z_pres[i, t] > 0.5:
                x0, y0, x1, y1 = boxes[i, t] - 0.5  # pixel edges -> imshow's pixel centres
                colour = STEP_COLOURS[t % len(STEP_COLOURS)]
                for ax in (axes[i, 0], axes[i, t + 1]):
                    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, color=colour))
    for j, title in enumerate(["input"] + [f"steps 1-{t + 1}" if t else "step 1" for t in range(T)]):
        axes[0, j].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve(records: list[dict], path: Path) -> Path:
    """Periodic ELBO and mean steps used on evaluation characters against training minutes."""
    ev = [r for r in records if r.get("kind") == "eval"]
    minutes = [r["train_time_s"] / 60 for r in ev]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(minutes, [r["elbo"] for r in ev], "o-", ms=3)
    a.set_ylabel("ELBO (nats / image)")
    b.plot(minutes, [r["mean_count"] for r in ev], "o-", ms=3)
    b.set_ylabel("mean steps used")
    for ax in (a, b):
        ax.set_xlabel("training minutes (evaluation excluded)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    background = first(omniglot.load("background", args.data_dir, args.canvas), args.n_train, args.seed)
    evaluation = omniglot.load("evaluation", args.data_dir, args.canvas)
    periodic, test = first(evaluation, args.eval_n, 1), first(evaluation, args.test_n, 2)
    run = Path(args.run)
    # train() is annotated for MultiMnist; it needs only .images, .counts, float_images and len (duck typing).
    # overwrite: a fresh run, whose curve must not mix with an older one
    train(train_config(args), progress=False, data=(background, periodic), overwrite=True)
    model = load(run / CHECKPOINT_NAME, device=args.device)
    elbo_test = mean_elbo(model, test, args.elbo_samples, args.device)
    elbo_train = mean_elbo(model, first(background, len(test), 3), args.elbo_samples, args.device)
    used = steps_used(model, test, args.device)
    records = read_metrics(run / "metrics.jsonl")
    steps, minutes = max(r["step"] for r in records), max(r["train_time_s"] for r in records) / 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = first(test, 10, FIGURE_SEED).float_images()
    step_figure(model, torch.from_numpy(shown).to(args.device), out / f"{args.name}_steps.png")
    curve(records, out / f"{args.name}_curve.png")
    header = ["set", "images", "ELBO (nats / image)"] + [f"{k} steps" for k in range(len(used))] + ["mean steps"]
    rows = [
        [
            "evaluation (test)",
            len(test),
            f"{elbo_test:.1f}",
            *(f"{u:.1%}" for u in used),
            f"{used @ np.arange(len(used)):.2f}",
        ],
        ["background (train)", len(test), f"{elbo_train:.1f}"] + ["-"] * (len(used) + 1),
    ]
    budget = f"{args.minutes:g} minutes" if args.steps is None else f"{args.steps} steps (or {args.minutes:g} min)"
    table = markdown_table(header, rows) + (
        f"\n\nBudget: trained for at most {budget} of training wall-clock (evaluation excluded): {steps} steps, "
        f"{minutes:.1f} min, batch {args.batch_size}, on {args.device}; {len(background)} background images at "
        f"{args.canvas}x{args.canvas}, T = {args.max_steps}, scale prior median {args.scale_prior} (log-sd "
        f"{args.scale_prior_sd}), z_pres prior {args.z_pres_prior}. ELBO averaged over {args.elbo_samples} guide "
        f"samples; steps used = the most probable count. The paper reports no Omniglot ELBO; it shows "
        f"decompositions into stroke-like parts.\n\n![steps]({args.name}_steps.png)\n\n![curve]({args.name}_curve.png)"
    )
    record = {
        "elbo_test": elbo_test,
        "elbo_train": elbo_train,
        "steps_used": used.tolist(),
        "train_steps": steps,
        "train_minutes": minutes,
        "args": vars(args),
    }
    write_results(args.name, record, table, out)
    return record


if __name__ == "__main__":
    main()
