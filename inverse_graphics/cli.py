"""`inverse-graphics {demo, train, infer, eval, scenes, data, export, convert}`: a thin layer that builds configs and
calls the same functions the tests drive."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from err


def _finite(text: str) -> float:
    """argparse type of every float option: a finite number (nan and inf would only fail later, inside a run)."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return value


def check_device(device: str | None) -> None:
    """ValueError unless `device` (a --device value; None: not given) is the CPU or a CUDA GPU present here, so
    that every command says so before any work rather than failing inside torch."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N): {err}") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: this toolkit runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s) here")


MODELS_2D = ("air", "dair")
MODELS_3D = ("air-tabletop", "supervised-tabletop")

# option name -> config field, for options every trainer has; unset (None) options keep the trainer's default
_SHARED = {
    "seed": "seed",
    "minutes": "minutes",
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "n_train": "n_train",
    "eval_n": "eval_n",
    "eval_every": "eval_every_s",
    "checkpoint_every": "checkpoint_every_s",
    "log_every": "log_every",
    "device": "device",
    "threads": "threads",
}
_ONLY_2D = {
    "baseline_lr": "baseline_lr",
    "train_counts": "train_counts",
    "eval_counts": "eval_counts",
    "overlap": "overlap",
    "lr_decay_start": "lr_decay_start",
    "lr_half_life": "lr_half_life",
    "lr_floor": "lr_floor",
    "max_steps": "max_steps",
    "z_pres_prior": "z_pres_prior",
    "z_pres_prior_start": "z_pres_prior_start",
    "anneal_steps": "anneal_steps",
    "data_dir": "data_dir",
    "init_from": "init_from",
}
_ONLY_AIR3D = {
    "baseline_lr": "baseline_lr",
    "recipe": "recipe",
    "gradient": "gradient",
    "sleep_steps": "sleep_steps",
    "sleep_fraction": "sleep_fraction",
    "lr_drop_fraction": "lr_drop_fraction",
    "eval_refine": "eval_refine",
    "data_cache": "data_cache",
    "init_from": "init_from",
    "baseline_warmup": "baseline_warmup",
    "lr_drop_step": "lr_drop_step",
    "lr_drop_to": "lr_drop_to",
    "wake_lr": "wake_lr",
}
_ONLY_3D = {
    "world": "world",
    "min_objects": "min_objects",
    "max_objects": "max_objects",
    "image_size": "image_size",
    "backend": "backend",
}


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model: air, dair (multi-MNIST); air-tabletop, supervised-tabletop (tabletop renders)",
        description="Unset options keep the model's own default (the config dataclasses in inverse_graphics/).",
    )
    p.add_argument("model", choices=[*MODELS_2D, *MODELS_3D])
    p.add_argument("--out", default=None, help="run directory (default runs/<model>)")
    p.add_argument("--seed", type=int)
    p.add_argument("--minutes", type=_finite, help="training wall-clock budget")
    p.add_argument("--steps", type=int, help="step budget (stops at the first budget reached)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=_finite)
    p.add_argument("--baseline-lr", type=_finite, help="NVIL baseline's rate (air, dair, air-tabletop)")
    p.add_argument("--n-train", type=int, help="training scenes")
    p.add_argument("--eval-n", type=int, help="held-out scenes of the periodic evaluation")
    p.add_argument("--eval-every", type=_finite, help="seconds between evaluations")
    p.add_argument("--checkpoint-every", type=_finite, help="seconds")
    p.add_argument("--log-every", type=int, help="steps between training-statistics records")
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint; options given now change only budgets, cadence and "
        "devices (others are refused)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (else refused)")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("multi-MNIST models (air, dair)")
    g.add_argument("--train-counts", type=_counts, help="e.g. 0,1,2")
    g.add_argument("--eval-counts", type=_counts)
    g.add_argument(
        "--overlap",
        choices=["clip", "reject", "separate"],
        help="clip (sum and clip), reject (Pyro's: redraw crossing strokes) or separate (redraw touching ink boxes)",
    )
    g.add_argument("--lr-decay-start", type=int, help="step where the main rate decays")
    g.add_argument("--lr-half-life", type=int, help="steps per halving of the main rate")
    g.add_argument("--lr-floor", type=_finite)
    g.add_argument("--max-steps", type=int, help="T, the most objects per scene")
    g.add_argument("--z-pres-prior", type=_finite)
    g.add_argument("--z-pres-prior-start", type=_finite, help="anneal from this value")
    g.add_argument("--anneal-steps", type=int)
    g.add_argument("--data-dir")
    g.add_argument(
        "--likelihood-sd",
        type=_positive,
        help="sigma of the Gaussian pixel likelihood (default 0.3, the paper's); with --init-from, the loaded "
        "model is trained on under this one",
    )
    g.add_argument(
        "--dair-memory", action="store_true", help="dair: steps also see the recurrent state (the older variant)"
    )
    g = p.add_argument_group("tabletop models (air-tabletop, supervised-tabletop)")
    g.add_argument("--recipe", choices=["wake", "sleep", "sleep-then-wake", "wake-sleep"], help="air-tabletop")
    g.add_argument("--gradient", choices=["fd", "soft"], help="air-tabletop: finite differences or soft raster")
    g.add_argument("--sleep-fraction", type=_finite, help="air-tabletop, sleep-then-wake: the sleep phase's share "
                   "of the budget (0.75)")  # fmt: skip
    g.add_argument("--sleep-steps", type=int, help="air-tabletop, sleep-then-wake: steps of the sleep phase instead")
    g.add_argument("--eval-refine", type=int, help="air-tabletop: refinement steps in the periodic evaluation")
    g.add_argument("--data-cache", help="air-tabletop: cache file of the training renders (the checkpoint format)")
    g.add_argument("--lr-drop-fraction", type=_finite, help="air-tabletop: share of the budget from which the "
                   "main rate is --lr-drop-to (0.5)")  # fmt: skip
    g.add_argument("--lr-drop-step", type=int, help="air-tabletop: step from which the main rate is --lr-drop-to")
    g.add_argument("--lr-drop-to", type=_finite, help="air-tabletop")
    g.add_argument("--wake-lr", type=_finite, help="air-tabletop, sleep-then-wake: the main rate of the ELBO phase")
    g.add_argument("--baseline-warmup", type=int, help="air-tabletop: first ELBO steps training only the baseline")
    g.add_argument(
        "--init-from", help="air, dair, air-tabletop: start from this checkpoint's weights (fresh optimiser and steps)"
    )
    g.add_argument(
        "--world",
        help="the scenes' World: a built-in name (primitives, kitchen) or a world file (inverse-graphics world init); "
        "it sets the objects, camera, image size and count range, and its [randomize] section the training images",
    )
    g.add_argument("--min-objects", type=int)
    g.add_argument("--max-objects", type=int)
    g.add_argument("--image-size", type=int)
    g.add_argument("--backend", choices=["auto", "opengl", "pytorch3d"], help="renderer of the data")
    g.add_argument("--naive-yaw", action="store_true", help="supervised-tabletop: plain (cos, sin) yaw targets")
    p.set_defaults(func=_run_train)


def _given(args, names: dict[str, str]) -> dict:
    return {field: getattr(args, opt) for opt, field in names.items() if getattr(args, opt) is not None}


def _check_applies(args, names: dict[str, str]) -> None:
    """ValueError naming every option given that the chosen model does not take (rather than ignoring it)."""
    every = {**_SHARED, **_ONLY_2D, **_ONLY_AIR3D, **_ONLY_3D}
    foreign = [o for o in every if o not in names and getattr(args, o) is not None]
    foreign += ["naive_yaw"] if args.naive_yaw and args.model != "supervised-tabletop" else []
    foreign += ["dair_memory"] if args.dair_memory and args.model != "dair" else []
    foreign += ["likelihood_sd"] if args.likelihood_sd is not None and args.model not in MODELS_2D else []
    if args.world is not None:  # the world sets these
        foreign += [o for o in ("min_objects", "max_objects", "image_size") if getattr(args, o) is not None]
    if foreign:
        listed = ", ".join("--" + o.replace("_", "-") for o in foreign)
        raise ValueError(f"{listed} do(es) not apply to `train {args.model}`; see `inverse-graphics train --help`")


def _model_fields(args, saved: dict | None) -> dict:
    """The config fields set by model-specific flags; on resume only those given (the rest stay the run's)."""
    fields: dict[str, Any] = {}
    overrides = dict(saved.get("model_overrides", {})) if saved else {}
    if args.model in MODELS_2D:
        fields["model"] = args.model
        if args.dair_memory or not saved:
            fields["dair_memory"] = args.dair_memory
        if args.likelihood_sd is not None:
            overrides["likelihood_sd"] = args.likelihood_sd
        fields["model_overrides"] = overrides
    elif args.model == "supervised-tabletop":
        if args.naive_yaw:
            overrides["symmetric_yaw"] = False
        fields["model_overrides"] = overrides
    return fields


def _run_train(args) -> int:
    from inverse_graphics.rundir import saved_config

    names = {**_SHARED, **(_ONLY_2D if args.model in MODELS_2D else _ONLY_3D)}
    names.update(_ONLY_AIR3D if args.model == "air-tabletop" else {})
    _check_applies(args, names)
    out = args.out or f"runs/{args.model}"
    # On resume (or a torchrun restart) the run's own config is the base, so that an option not given again keeps
    # the run's value instead of the default; the trainer then applies or refuses what was given.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    kinds = MODELS_2D if args.model in MODELS_2D else (args.model,)
    saved = saved_config(out, kinds) if args.resume or restarted else None
    base = {k: v for k, v in (saved or {}).items() if k != "out_dir"}
    kw: dict[str, Any] = {**base, "out_dir": out, **_given(args, names), **_model_fields(args, saved)}
    resume, progress, overwrite = args.resume, not args.no_progress, args.overwrite
    if args.model in MODELS_2D:
        from inverse_graphics.train import TrainConfig, train

        rec = train(TrainConfig.from_dict(kw), resume, progress, overwrite=overwrite)
    elif args.model == "air-tabletop":
        from inverse_graphics.tabletop.train_air3d import AIR3DTrainConfig, train_air3d

        rec = train_air3d(AIR3DTrainConfig.from_dict(kw), resume, progress, overwrite=overwrite)
    else:
        from inverse_graphics.tabletop.train_supervised3d import SupervisedTrainConfig, train_supervised

        rec = train_supervised(SupervisedTrainConfig.from_dict(kw), resume, progress, overwrite=overwrite)
    print(json.dumps(rec))
    return 0


def _add_infer(sub) -> None:
    p = sub.add_parser(
        "infer", help="infer objects in image files (multi-MNIST or tabletop renders); writes JSON and figures"
    )
    p.add_argument("images", nargs="+", help="PNG/JPEG files")
    p.add_argument("--model", default="air-multi-mnist", help="a pretrained name or a checkpoint path")
    p.add_argument("--out", default="out/infer", help="output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--refine", type=_non_negative_int, default=None, help="tabletop models: refinement steps (0: none)")
    p.add_argument(
        "--refine-gradient",
        choices=["fd", "soft"],
        default="fd",
        help="tabletop models: refinement gradients from finite differences of the black box or the soft rasterizer",
    )
    p.add_argument(
        "--resize",
        action="store_true",
        help="tabletop models: resize images of another size to the model's world (default: refuse them)",
    )
    p.add_argument(
        "--no-search",
        dest="search",
        action="store_false",
        default=None,
        help="tabletop models: refine poses only, without the structure search that adds and removes objects",
    )
    p.set_defaults(func=_run_infer)


def _run_infer(args) -> int:
    from inverse_graphics.infer import InferConfig, main

    paths = {"images": args.images, "model": args.model, "out_dir": args.out}
    options = {"refine": args.refine, "refine_gradient": args.refine_gradient, "resize": args.resize}
    options["search"] = args.search
    main(InferConfig(**paths, device=args.device, **options))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="compose multi-MNIST scenes, run the shipped model, write a figure")
    p.add_argument("--n", type=int, default=8, help="scenes to compose")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tabletop-model", default="air-kitchen", help="shipped 3D model of the second part")
    p.add_argument("--n-tabletop", type=int, default=4, help="tabletop scenes (0: the 2D part only)")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from inverse_graphics.demo import DemoConfig, main

    main(DemoConfig(n=args.n, seed=args.seed, out_dir=args.out, device=args.device,
                    tabletop_model=args.tabletop_model, n_tabletop=args.n_tabletop))  # fmt: skip
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="count accuracy of a 2D model on held-out multi-MNIST scenes, or the comparison table of tabletop "
        "models on held-out scenes of their world",
    )
    p.add_argument("--model", default="air-multi-mnist", help="a pretrained name or a checkpoint path")
    p.add_argument(
        "--n", type=_positive_int, default=None, help="held-out scenes (default 10,000 for 2D, 1,000 for tabletop)"
    )
    p.add_argument("--counts", type=_counts, default=(0, 1, 2))
    p.add_argument("--seed", type=int, default=2016)
    p.add_argument("--overlap", choices=["clip", "reject", "separate"], default="clip")
    p.add_argument(
        "--search-steps",
        type=int,
        default=0,
        help="> 0: let the model choose each count (every count refined for this many steps, scored by its bound; "
        "~1 s per scene at 200 on one CPU thread for T = 4) instead of the guide",
    )
    p.add_argument(
        "--compare", nargs="+", default=(), metavar="MODEL", help="tabletop: more models scored on the same scenes"
    )
    p.add_argument("--world", default=None, help="tabletop: the scenes' world, a name or a file (default: the model's)")
    p.add_argument(
        "--refine", type=_non_negative_int, default=None, help="tabletop: refinement steps (default: each model's)"
    )
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
            search_steps=args.search_steps,
            compare=tuple(args.compare),
            world=args.world,
            refine=args.refine,
        )
    )
    print(json.dumps({k: v for k, v in rec.items() if k != "table"}))
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


def _add_world(sub) -> None:
    from inverse_graphics import world_cli

    world_cli.register(sub)


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="rewrite an old-format (pickle, .pt) checkpoint as a safetensors one, which loads without running code",
    )
    p.add_argument("old", help="the old checkpoint (e.g. runs/air/checkpoint.pt)")
    p.add_argument("new", help="the checkpoint to write (e.g. runs/air/checkpoint.safetensors)")
    p.add_argument(
        "--trusted",
        action="store_true",
        help="required: reading the old format means unpickling it, which runs any code the file names; give it "
        "only for a file from a source you trust",
    )
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from inverse_graphics.checkpoint import convert_legacy

    path = convert_legacy(args.old, args.new, trusted=args.trusted)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inverse-graphics", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    adders = (_add_demo, _add_train, _add_infer, _add_eval, _add_scenes, _add_data, _add_export, _add_convert)
    for add in adders:
        add(sub)
    _add_world(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from inverse_graphics.checkpoint import CheckpointError
    from scenes.mnist import DataNotFoundError

    args = build_parser().parse_args(argv)
    try:
        check_device(getattr(args, "device", None))
        return args.func(args)
    except (CheckpointError, DataNotFoundError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"inverse-graphics {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
