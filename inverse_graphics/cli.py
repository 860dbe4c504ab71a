"""`inverse-graphics {demo, train, infer, eval, scenes, bench, data, export}`: a thin layer that builds configs and
calls the same functions the tests drive."""

from __future__ import annotations

import argparse
import json
import sys


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from err


def _add_train(sub) -> None:
    from inverse_graphics.train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model (air, dair) on multi-MNIST")
    p.add_argument("model", choices=["air", "dair"])
    p.add_argument("--out", default=None, help="run directory (default runs/<model>)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--minutes", type=float, default=d.minutes, help="training wall-clock budget")
    p.add_argument("--steps", type=int, default=None, help="step budget (stops at the first budget reached)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--baseline-lr", type=float, default=d.baseline_lr)
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--train-counts", type=_counts, default=d.train_counts, help="e.g. 0,1,2")
    p.add_argument("--eval-counts", type=_counts, default=d.eval_counts)
    p.add_argument(
        "--overlap",
        choices=["clip", "reject"],
        default=d.overlap,
        help="multi-MNIST overlaps: clip (sum and clip) or reject (Pyro's generator: redraw)",
    )
    p.add_argument("--lr-decay-start", type=int, default=d.lr_decay_start, help="step where the main rate decays")
    p.add_argument("--lr-half-life", type=int, default=d.lr_half_life, help="steps per halving of the main rate")
    p.add_argument("--lr-floor", type=float, default=d.lr_floor)
    p.add_argument("--eval-n", type=int, default=d.eval_n)
    p.add_argument("--eval-every", type=float, default=d.eval_every_s, help="seconds between evaluations")
    p.add_argument("--checkpoint-every", type=float, default=d.checkpoint_every_s, help="seconds")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="T, the most objects per scene")
    p.add_argument("--z-pres-prior", type=float, default=d.z_pres_prior)
    p.add_argument("--z-pres-prior-start", type=float, default=None, help="anneal from this value")
    p.add_argument("--anneal-steps", type=int, default=d.anneal_steps)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from inverse_graphics.train import TrainConfig, train

    cfg = TrainConfig(
        model=args.model,
        out_dir=args.out or f"runs/{args.model}",
        seed=args.seed,
        minutes=args.minutes,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        baseline_lr=args.baseline_lr,
        n_train=args.n_train,
        train_counts=args.train_counts,
        eval_counts=args.eval_counts,
        overlap=args.overlap,
        lr_decay_start=args.lr_decay_start,
        lr_half_life=args.lr_half_life,
        lr_floor=args.lr_floor,
        eval_n=args.eval_n,
        eval_every_s=args.eval_every,
        checkpoint_every_s=args.checkpoint_every,
        max_steps=args.max_steps,
        z_pres_prior=args.z_pres_prior,
        z_pres_prior_start=args.z_pres_prior_start,
        anneal_steps=args.anneal_steps,
        data_dir=args.data_dir,
        device=args.device,
        threads=args.threads,
    )
    rec = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(rec))
    return 0


def _add_infer(sub) -> None:
    p = sub.add_parser("infer", help="infer objects in PNG images; writes JSON and overlay PNGs")
    p.add_argument("images", nargs="+", help="PNG/JPEG files")
    p.add_argument("--model", default="air-multi-mnist", help="a pretrained name or a checkpoint path")
    p.add_argument("--out", default="out/infer", help="output directory")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_infer)


def _run_infer(args) -> int:
    from inverse_graphics.infer import InferConfig, main

    main(InferConfig(images=args.images, model=args.model, out_dir=args.out, device=args.device))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="compose multi-MNIST scenes, run the shipped model, write a figure")
    p.add_argument("--n", type=int, default=8, help="scenes to compose")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from inverse_graphics.demo import DemoConfig, main

    main(DemoConfig(n=args.n, seed=args.seed, out_dir=args.out, device=args.device))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="count accuracy of a model on held-out multi-MNIST scenes")
    p.add_argument("--model", default="air-multi-mnist", help="a pretrained name or a checkpoint path")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--counts", type=_counts, default=(0, 1, 2))
    p.add_argument("--seed", type=int, default=2016)
    p.add_argument("--overlap", choices=["clip", "reject"], default="clip")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from inverse_graphics.evaluate import EvalConfig, main

    rec = main(
        EvalConfig(
            model=args.model,
            n=args.n,
            counts=args.counts,
            seed=args.seed,
            overlap=args.overlap,
            data_dir=args.data_dir,
            device=args.device,
        )
    )
    print(json.dumps(rec))
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="fetch datasets (online) into the cache or --dest")
    p.add_argument("action", choices=["download"])
    p.add_argument("--dest", default=None)
    p.set_defaults(func=_run_data)


def _run_data(args) -> int:
    from scenes import mnist

    print(f"MNIST verified in {mnist.download(args.dest)}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="strip a training checkpoint down to shippable weights")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--float32", action="store_true", help="keep float32 (default: float16, half the size)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from inverse_graphics.pretrained import export

    path = export(args.checkpoint, args.out, half=not args.float32)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _add_scenes(sub) -> None:
    try:
        from inverse_graphics import scenes_cli
    except ImportError:
        return
    scenes_cli.register(sub)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (same as python -m benchmarks.NAME)")
    p.add_argument("name")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    import runpy

    sys.argv = [f"benchmarks/{args.name}.py", *args.rest]  # so results record `python -m benchmarks.NAME`
    runpy.run_module(f"benchmarks.{args.name}", run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inverse-graphics", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_train, _add_infer, _add_eval, _add_scenes, _add_bench, _add_data, _add_export):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from inverse_graphics.checkpoint import CheckpointError
    from scenes.mnist import DataNotFoundError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, DataNotFoundError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"inverse-graphics {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
