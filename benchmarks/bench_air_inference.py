"""Amortised inference speed of a 2D AIR model: images/s at batch 64 and latency for one image.

Medians over repeated timed runs (after warm-up). The model's `infer` is timed end to end (input checks
included), on held-out-like multi-MNIST scenes from the bundled digits. Reconstruction is not part of the
inference (counts, z_pres, z_where, boxes) being measured unless --with-recon is given.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.common import markdown_table, write_results
from inverse_graphics.evaluate import load_model
from scenes import mnist, multi_mnist


def time_infer(model, x: torch.Tensor, repeats: int, reps_per_timing: int, recon: bool) -> list[float]:
    """Seconds per `infer` call, one value per timing (each the mean of reps_per_timing calls)."""
    for _ in range(10):
        model.infer(x, reconstruct=recon)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps_per_timing):
            model.infer(x, reconstruct=recon)
        out.append((time.perf_counter() - t0) / reps_per_timing)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="air-multi-mnist")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--with-recon", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="air_inference")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device)
    data = multi_mnist.generate(mnist.load_sample(), 64, np.random.default_rng(0))
    x = torch.from_numpy(data.float_images()).to(args.device)
    rows, record = [], {"model": args.model, "threads": torch.get_num_threads(), "with_recon": args.with_recon}
    for batch in (64, 1):
        times = time_infer(model, x[:batch], args.repeats, 50 if batch == 64 else 200, args.with_recon)
        med = statistics.median(times)
        record[f"batch{batch}"] = {
            "median_s_per_call": med,
            "images_per_s": batch / med,
            "min_s": min(times),
            "max_s": max(times),
            "repeats": args.repeats,
        }
        rows.append(
            [batch, f"{med * 1e3:.3f}", f"{batch / med:,.0f}", f"{min(times) * 1e3:.3f}-{max(times) * 1e3:.3f}"]
        )
    table = markdown_table(["batch", "median ms / call", "images/s", "range ms"], rows)
    targets = (
        f"\nTargets: >= 10,000 images/s at batch 64 "
        f"({'met' if record['batch64']['images_per_s'] >= 10_000 else 'missed'}); <= 1 ms for one image "
        f"({'met' if record['batch1']['median_s_per_call'] <= 1e-3 else 'missed'})."
    )
    write_results(args.name, record, table + targets)
    return record


if __name__ == "__main__":
    main()
