"""Representational power: how many labels do small networks need on AIR's latents, against a CNN on pixels?

Eslami et al. 2016, multi-MNIST experiments, "Representational power": networks trained on AIR's inferred latents
learn (a) the sum of the digits in a scene and (b) whether the digits are in ascending order from left to right,
reaching ~95% with far fewer labelled scenes than a CNN trained on the pixels. The paper does not specify its
networks; the ones here, and the choices they embody, are:
- latents: for each of the T steps, [z_pres, z_where (s, x, y), z_what] from `model.infer` (the most probable
  count, posterior means), zeroed for absent steps, standardised with the (unlabelled) pool's statistics, and the steps
  ordered left to right by x (absent steps last). Ordering uses only what AIR inferred (its z_where), and it lets a
  small network read "left digit, right digit" without learning a sort. Two networks read them:
  - "AIR latents, per-object net" (`ObjectNet`): one shared MLP reads each object into a digit distribution, and
    the task's answer is computed exactly from them (the sum's distribution as their convolution, the probability
    of the order by a forward pass over the objects);
  - "AIR latents, MLP" (`LatentNet`): a shared per-step MLP embeds each step, the embeddings are concatenated and a
    second MLP classifies (no knowledge of the task's structure).
- pixels: a three-layer CNN (32-64-64 channels, 5/5/3 kernels, max-pooling) and an MLP head.
What the latents carry: "AIR latents, digit labels (reference)" trains the per-object digit classifier on the
labelled scenes' digit labels instead (each present step gets the class of the true digit it is assigned to by
position, `matched_digits`) and answers the task from its predicted digits: far richer supervision than one label per
scene, so it shows how much of each task AIR's latents allow at all. Two things cap it: a scene whose count AIR gets
wrong is hard to answer (the shipped model counts 96.3% of the 2-digit test scenes right), and z_what tells digits
apart imperfectly when a neighbour's ink enters the window (a development probe, 57,704 position-matched objects with
digit labels: 94.4% on the test objects, against 97.5% for single-digit scenes). Refining z_what by 30 Adam steps on
the ELBO per scene (an amortisation-gap check) gave 94.6%: the encoder is not what loses the digit.
All are trained from scratch for every number of labels with the same optimiser, steps and batch size, and scored
on --test-n scenes of MNIST test digits. Scenes: --counts digits (default exactly 2, so both tasks are well posed;
"ascending" means non-decreasing, equal digits included); training scenes from MNIST train digits, the labelled
sets are nested prefixes of one pool. Sum is a (9 * max count + 1)-way classification.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from benchmarks.common import RESULTS, markdown_table, write_results  # noqa: E402
from inverse_graphics.air import AIR, AIRConfig  # noqa: E402
from inverse_graphics.evaluate import load_model  # noqa: E402
from inverse_graphics.train import EVAL_SEED  # noqa: E402
from scenes import mnist, multi_mnist  # noqa: E402

TASKS = ("sum", "ascending")
INPUTS = {  # --inputs choice -> the name in tables and figures
    "objects": "AIR latents, per-object net",
    "latents": "AIR latents, MLP",
    "pixels": "CNN on pixels",
    "digits": "AIR latents, digit labels (reference)",
}
ORDER_EPS = 1e-6  # probabilities of the order are kept this far from 0 and 1
STUCK_MARGIN = 0.005  # a classifier this close to the majority class's accuracy is marked as stuck there
PAPER_ACCURACY = 0.95  # both tasks, with AIR's latents (approximate, read off the paper's figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="air-multi-mnist", help="pretrained name, checkpoint path, or 'untrained'")
    p.add_argument("--n-labels", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 3000, 10_000, 30_000])
    p.add_argument("--test-n", type=int, default=5000)
    p.add_argument("--counts", type=int, nargs="+", default=[2], help="digits per scene")
    p.add_argument("--overlap", choices=multi_mnist.OVERLAP_RULES, default="reject")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps per classifier")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inputs", nargs="+", choices=list(INPUTS), default=list(INPUTS), help="which classifiers")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="MNIST location")
    p.add_argument("--name", default="representation")
    p.add_argument("--out", default=str(RESULTS), help="where the table and figure go")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------- labels
def ordered_labels(data: multi_mnist.MultiMnist) -> np.ndarray:
    """int64 (N, M): each scene's digit classes ordered left to right by box centre, -1 for absent slots last."""
    centre = np.nan_to_num((data.boxes[..., 0] + data.boxes[..., 2]) / 2, nan=np.inf)  # (N, M)
    order = np.argsort(centre, axis=1, kind="stable")
    return np.take_along_axis(data.labels, order, axis=1)


def task_labels(data: multi_mnist.MultiMnist, task: str) -> np.ndarray:
    """int64 (N,): the sum of the digits, or 1 if they are non-decreasing left to right (vacuously for < 2)."""
    labels = ordered_labels(data)
    if task == "sum":
        return np.where(labels >= 0, labels, 0).sum(1).astype(np.int64)
    later = labels[:, 1:]
    ok = (later < 0) | (later >= labels[:, :-1])  # absent slots are last: they never break the order
    return np.asarray(ok.all(1), dtype=np.int64)


def n_classes(task: str, max_count: int) -> int:
    return 9 * max_count + 1 if task == "sum" else 2


# ------------------------------------------------------------------------------------------------------ latents
@torch.no_grad()
def latent_steps(model: AIR, data: multi_mnist.MultiMnist, device: str, batch: int = 1000) -> torch.Tensor:
    """FloatTensor (N, T, 4 + D): per step [z_pres, z_where, z_what] of `model.infer`, zero where absent, the steps
    ordered by the inferred x (present steps first)."""
    parts = []
    for start in range(0, len(data), batch):
        out = model.infer(torch.from_numpy(data.float_images(start, start + batch)).to(device))
        z = torch.cat([out.z_pres[..., None], out.z_where, out.z_what], dim=-1) * out.z_pres[..., None]  # (B, T, F)
        x = torch.where(out.z_pres > 0.5, out.z_where[..., 1], torch.full_like(out.z_pres, float("inf")))  # (B, T)
        order = x.argsort(dim=1, stable=True)
        parts.append(z.gather(1, order[..., None].expand_as(z)).cpu())
    return torch.cat(parts)


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale every feature by the labelled pool's mean and sd over all steps (z_pres is left as 0/1)."""
    flat = train.flatten(0, 1)
    mean, sd = flat.mean(0), flat.std(0) + 1e-6
    mean[0], sd[0] = 0.0, 1.0
    return [(t - mean) / sd for t in (train, *others)]


# ----------------------------------------------------------------------------------------------------- networks
class LatentNet(nn.Module):
    """(B, T, F) ordered latents -> (B, K) logits: a shared per-step MLP, then an MLP over the concatenation."""

    def __init__(self, steps: int, features: int, classes: int, hidden: int = 64):
        super().__init__()
        self.step = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(steps * hidden, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.step(z).flatten(1))  # (B, T, hidden) -> (B, T * hidden) -> (B, K)


class ObjectNet(nn.Module):
    """(B, T, F) ordered latents -> (B, K) log-probabilities, reading each object separately.

    A shared MLP reads each present step's latents (the steps are ordered left to right, absent ones last) into a
    distribution over its digit class, p_t (10-way), and the answer's distribution is computed exactly from the
    present steps' p_t, as if the digits were independent draws from them:
    - sum: the convolution of the p_t (`sum_log_probs`);
    - ascending: the probability that the digits are non-decreasing left to right (`ascending_log_probs`).
    Only the scene's label trains it, no digit labels. Absent steps (z_pres = 0) contribute nothing. From labels this
    weak the classes can collapse (every object read as one digit answers "ascending" for every scene), so training
    (`loss`) adds `spread` times the negative entropy of the batch's mean digit distribution: a prior that all
    digits occur, nothing about which is which. Development runs on 10,000 ascending labels (seed 0): 83% with a
    scalar score per object compared pairwise (Bradley-Terry / RankNet style; the order was right, the scores too
    spread within a class), 89% with the exact probability, 90% with it and the spread term (1,000 labels: 76% /
    80%).
    """

    def __init__(self, features: int, task: str, classes: int, hidden: int = 256, digits: int = 10, spread=1.0):
        super().__init__()
        self.task, self.classes, self.spread = task, classes, spread
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, digits)
        )

    def answer(self, p: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        if self.task == "sum":
            return sum_log_probs(p, present, self.classes)
        return ascending_log_probs(p, present)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        present = z[..., :1] > 0.5  # (B, T, 1); z_pres is kept as 0/1 by `standardise`
        return self.answer(self.net(z).softmax(-1), present)

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training loss on a batch: the labels' cross-entropy plus the spread term (see the class docstring)."""
        present = z[..., :1] > 0.5
        p = self.net(z).softmax(-1)  # (B, T, 10)
        loss = F.nll_loss(self.answer(p, present), y)
        mean = p[present[..., 0]].mean(0)  # (10,) over the batch's present objects
        if len(mean) and torch.isfinite(mean).all():
            loss = loss + self.spread * (mean * mean.clamp_min(1e-12).log()).sum()
        return loss


def ascending_log_probs(p: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """p (B, T, 10) digit distributions, present (B, T, 1) with present steps first -> (B, 2) log P(not
    non-decreasing), log P(non-decreasing) of the present digits, left to right (1 for fewer than two digits).

    A forward pass over the steps: alpha[k] = P(the digits so far are non-decreasing and the last one is k)."""
    alpha = p[:, 0]  # (B, 10)
    for t in range(1, p.shape[1]):
        alpha = torch.where(present[:, t], p[:, t] * alpha.cumsum(-1), alpha)  # P(..., last <= k) * p_t(k)
    # Kept inside [eps, 1 - eps] before the logs: at P = 1, log(1 - P) has an infinite derivative, and a clamp
    # after it would turn that into NaN gradients (0 * inf) on every vacuously ordered scene.
    yes = alpha.sum(-1).clamp(ORDER_EPS, 1 - ORDER_EPS)  # (B,)
    return torch.stack([torch.log1p(-yes), yes.log()], dim=1)


def sum_log_probs(p: torch.Tensor, present: torch.Tensor, classes: int) -> torch.Tensor:
    """p (B, T, 10) digit distributions, present (B, T, 1) -> (B, classes) log P(sum of present digits = k)."""
    B, T, D = p.shape
    dist = p.new_zeros(B, classes)
    dist[:, 0] = 1.0
    for t in range(T):
        # convolve: new[k] = sum_d dist[k - d] p_t[d], as a sum of shifted copies (D is small)
        shifted = torch.stack([F.pad(dist, (d, 0))[:, :classes] for d in range(D)], dim=1)  # (B, D, K)
        new = (p[:, t, :, None] * shifted).sum(1)
        dist = torch.where(present[:, t], new, dist)
    return dist.clamp_min(1e-12).log()


def matched_digits(raw: torch.Tensor, data: multi_mnist.MultiMnist) -> torch.Tensor:
    """LongTensor (N, T): the class of the true digit each present step of `raw` (unstandardised `latent_steps`)
    is assigned to by position (the assignment of inferred window centres to true digit centres with the least total
    squared distance), -1 for absent steps and for steps left over when AIR found more objects than there are."""
    out = torch.full(raw.shape[:2], -1, dtype=torch.long)
    size = data.images.shape[-1]
    centres = (data.boxes[..., :2] + data.boxes[..., 2:]) / size - 1  # (N, M, 2) in normalised coordinates
    for i in range(len(raw)):
        steps = (raw[i, :, 0] > 0.5).nonzero()[:, 0].numpy()
        truth = np.nonzero(data.labels[i] >= 0)[0]
        if len(steps) and len(truth):
            where = raw[i, steps, 2:4].numpy()  # (steps, 2): inferred window centres
            d = ((where[:, None] - centres[i, truth][None]) ** 2).sum(-1)  # (steps, digits)
            rows, cols = linear_sum_assignment(d)
            out[i, steps[rows]] = torch.from_numpy(data.labels[i, truth[cols]])
    return out


def reference_digits(z, digits, z_test, args, gen) -> torch.Tensor:
    """A per-object digit classifier trained on digit labels (one per matched object of the labelled scenes) instead
    of the scene's label: how much of each task AIR's latents carry with far richer supervision. Returns its digit
    for every present test step, -1 for absent ones: LongTensor (N_test, T), steps left to right."""
    objects, labels = z[digits >= 0], digits[digits >= 0]
    net = nn.Sequential(nn.Linear(z.shape[-1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    fit(net, objects, labels, args, gen)
    with torch.no_grad():
        present = z_test[..., 0] > 0.5  # (N, T), present steps first, left to right
        return torch.where(present, net(z_test.to(args.device)).argmax(-1).cpu(), -1)


def answer_from_digits(digit: torch.Tensor, task: str) -> torch.Tensor:
    """digit (N, T) as from `reference_digits` -> the task's labels (N,): the sum of the present digits, or whether
    they are non-decreasing left to right."""
    if task == "sum":
        return digit.clamp_min(0).sum(1)
    later = digit[:, 1:]
    return ((later < 0) | (later >= digit[:, :-1])).all(1).long()


class PixelCNN(nn.Module):
    """(B, H, W) images in [0, 1] -> (B, K) logits: the supervised baseline on pixels."""

    def __init__(self, classes: int, size: int = multi_mnist.CANVAS_SIZE):
        super().__init__()
        self.conv = nn.ModuleList([nn.Conv2d(1, 32, 5, padding=2), nn.Conv2d(32, 64, 5, padding=2)])
        self.conv.append(nn.Conv2d(64, 64, 3, padding=1))
        side = size // 8  # three 2x2 max-pools
        self.head = nn.Sequential(nn.Linear(64 * side * side, 256), nn.ReLU(), nn.Linear(256, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x[:, None]  # (B, 1, H, W)
        for conv in self.conv:
            h = F.max_pool2d(F.relu(conv(h)), 2)
        return self.head(h.flatten(1))


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, args, gen) -> None:
    """Train `net` on (x, y) for args.steps Adam steps of random minibatches (`ObjectNet` with its own loss)."""
    net.to(args.device).train()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=1e-4)
    batch = min(args.batch_size, len(x))
    for _ in range(args.steps):
        idx = torch.randint(len(x), (batch,), generator=gen)
        xb, yb = x[idx].to(args.device), y[idx].to(args.device)
        loss = net.loss(xb, yb) if isinstance(net, ObjectNet) else F.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()


def fit_and_score(net: nn.Module, x: torch.Tensor, y: torch.Tensor, x_test, y_test, args, gen) -> float:
    """`fit`, then the test accuracy."""
    fit(net, x, y, args, gen)
    with torch.no_grad():
        pred = torch.cat(
            [net(x_test[i : i + 1000].to(args.device)).argmax(1).cpu() for i in range(0, len(x_test), 1000)]
        )
    return float((pred == y_test).float().mean())


def make_net(inputs: str, task: str, classes: int, steps: int, features: int) -> nn.Module:
    """A fresh classifier for one --inputs choice."""
    if inputs == "objects":
        return ObjectNet(features, task, classes)
    return LatentNet(steps, features, classes) if inputs == "latents" else PixelCNN(classes)


# --------------------------------------------------------------------------------------------------------- main
def build_model(name: str, device: str) -> AIR:
    if name == "untrained":  # smoke tests: the pipeline without a trained model
        return AIR(AIRConfig()).to(device).eval()
    return load_model(name, device)


def make_scenes(args) -> tuple[multi_mnist.MultiMnist, multi_mnist.MultiMnist]:
    """The labelled pool (max n-labels scenes, MNIST train digits) and the test scenes (MNIST test digits)."""
    pool_digits = mnist.load_digits("train", args.data_dir)
    test_digits = mnist.load_digits("test", args.data_dir)
    gen = multi_mnist.generate
    pool = gen(pool_digits, max(args.n_labels), np.random.default_rng(args.seed), args.counts, overlap=args.overlap)
    test = gen(test_digits, args.test_n, np.random.default_rng(EVAL_SEED), args.counts, overlap=args.overlap)
    return pool, test


def figure(curves: dict, args, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (task, by_input) in zip(axes[0], curves.items()):
        for label, accs in by_input.items():
            ax.plot(args.n_labels, accs, "o-", label=label, lw=1.2, ms=4)
        ax.axhline(PAPER_ACCURACY, color="gray", ls="--", lw=0.8, label="paper, AIR latents (~95%)")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("labelled scenes")
        ax.set_ylabel("test accuracy")
        ax.set_title({"sum": "sum of the digits", "ascending": "digits in ascending order"}[task])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.n_labels = sorted(args.n_labels)
    model = build_model(args.model, args.device)
    pool, test = make_scenes(args)
    raw_pool = latent_steps(model, pool, args.device)
    z_pool, z_test = standardise(raw_pool, latent_steps(model, test, args.device))
    digits_pool = matched_digits(raw_pool, pool) if "digits" in args.inputs else None
    inferred = (z_test[..., 0] > 0.5).sum(1).numpy()
    count_acc = float((inferred == test.counts).mean())
    px_pool, px_test = torch.from_numpy(pool.float_images()), torch.from_numpy(test.float_images())
    T, Fdim = z_pool.shape[1:]
    data = {"objects": (z_pool, z_test), "latents": (z_pool, z_test), "pixels": (px_pool, px_test)}
    data["digits"] = data["objects"]
    curves: dict[str, dict[str, list[float]]] = {}
    reference: dict[int, torch.Tensor] = {}  # n labels -> the digit-labelled classifier's test digits
    rows = []
    stuck = False  # did any classifier end at the majority class's accuracy (marked in the table)?
    for task in TASKS:
        y_pool, y_test = torch.from_numpy(task_labels(pool, task)), torch.from_numpy(task_labels(test, task))
        K = n_classes(task, max(args.counts))
        curves[task] = {INPUTS[i]: [] for i in args.inputs}
        for n in args.n_labels:
            accs = []
            for i in args.inputs:
                gen = torch.Generator().manual_seed(args.seed * 1000 + n)  # the same batches for every input
                torch.manual_seed(args.seed * 1000 + n)  # and the same initialisation for a given input
                x_pool, x_test = data[i]
                if digits_pool is not None and i == "digits":
                    if n not in reference:  # the same classifier for every task (same seeds): train it once
                        reference[n] = reference_digits(x_pool[:n], digits_pool[:n], x_test, args, gen)
                    acc = float((answer_from_digits(reference[n], task) == y_test).float().mean())
                else:
                    net = make_net(i, task, K, T, Fdim)
                    acc = fit_and_score(net, x_pool[:n], y_pool[:n], x_test, y_test, args, gen)
                curves[task][INPUTS[i]].append(acc)
                accs.append(acc)
            majority = float((y_test == torch.mode(y_pool[:n]).values).float().mean())
            marks = [" \\*" if acc <= majority + STUCK_MARGIN else "" for acc in accs]
            stuck = stuck or any(marks)
            rows.append([task, n, *(f"{acc:.1%}{m}" for acc, m in zip(accs, marks, strict=True)), f"{majority:.1%}"])
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(curves, args, out / f"{args.name}.png")
    header = ["task", "labelled scenes", *(INPUTS[i] for i in args.inputs), "majority class"]
    table = markdown_table(header, rows) + (
        f"\n\nModel: `{args.model}`; its count accuracy on these {args.test_n} test scenes: {count_acc:.1%}. "
        f"Scenes of {args.counts} digits (overlap rule '{args.overlap}'). Budget: every classifier trained for "
        f"{args.steps} Adam steps (lr {args.lr}, batch {args.batch_size}) from scratch, on {args.device}. The paper "
        f"reports ~{PAPER_ACCURACY:.0%} on both tasks with AIR's latents."
    )
    if stuck:
        table += (
            f" \\* within {STUCK_MARGIN:.1%} of the majority class: that classifier learned nothing it could use, from"
            " too few labels or by an optimisation failure of that run (compare another --seed)."
        )
    table += f"\n\n![accuracy]({args.name}.png)"
    record = {"model": args.model, "air_count_acc": count_acc, "curves": curves, "args": vars(args)}
    write_results(args.name, record, table, out)
    return record


if __name__ == "__main__":
    main()
