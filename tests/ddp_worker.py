"""Launched by torchrun from tests/test_distributed.py: one training step of every case in tests/ddp_cases.py on
this rank (gloo); rank 0 saves the resulting parameters to <out>/ddp_step.pt for the test to compare."""

from __future__ import annotations

import sys

import torch

from inverse_graphics import distributed
from tests.ddp_cases import CASES, one_step


def main(out: str) -> None:
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu")
    results = {case: one_step(case, ctx, out) for case in CASES}
    if ctx.is_main:
        torch.save(results, f"{out}/ddp_step.pt")
    distributed.teardown(ctx)


if __name__ == "__main__":
    main(sys.argv[1])
