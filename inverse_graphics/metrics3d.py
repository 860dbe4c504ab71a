"""Evaluation shared by every 3D method (3D AIR, the supervised regressor, any refinement of either).

Predicted objects are matched to true ones by the Hungarian algorithm on their distance on the table plane; a
pair further apart than `MatchSettings.gate` metres counts as unmatched (a missed true object plus a spurious
prediction), whatever the assignment paired it with. Over the matched pairs:

- identity accuracy: the shapes agree;
- position error: distance on the table plane, in millimetres;
- yaw error: `scenes.tabletop_objects.yaw_distance` (the smallest rotation modulo the shape's yaw symmetry), in
  degrees, over pairs whose identity is right and whose shape has a yaw at all (spheres and upright cylinders,
  symmetric under any yaw, are excluded). A wrongly identified object has no well-defined yaw error: the two
  shapes' symmetries differ.

Count accuracy is per scene: the number of predicted objects equals the number of true ones. Predictions need not
be valid scenes (they may overlap or stand partly off the table); only shapes and finite poses are required.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from scenes.tabletop import Scene, TableObject
from scenes.tabletop_objects import SHAPES, YAW_PERIOD, yaw_distance

__all__ = ["MatchSettings", "MatchedPair", "SceneMatch", "as_scene", "match_scene", "summarize", "evaluate_method"]


@dataclass(frozen=True)
class MatchSettings:
    """How predictions are paired with true objects."""

    # metres: half the closest possible centre distance of two sampled objects (two boxes side by side, 0.07 m
    # wide plus tabletop.MIN_GAP, are 0.08 m apart), so one prediction can never be near two true objects, and
    # about half an object's size, so a prediction this far off has not found the object
    gate: float = 0.04


@dataclass(frozen=True)
class MatchedPair:
    """One predicted object paired with one true object."""

    true_index: int  # index into the true scene's objects
    pred_index: int  # index into the predicted scene's objects
    true_shape: str
    pred_shape: str
    position_error_mm: float  # table-plane distance, millimetres
    yaw_error_deg: float | None  # symmetry-reduced, degrees; None if the shapes differ or yaw is meaningless


@dataclass(frozen=True)
class SceneMatch:
    """The matching of one predicted scene to its true scene."""

    n_true: int
    n_pred: int
    pairs: tuple[MatchedPair, ...]


def as_scene(scene: Scene | dict) -> Scene:
    """A Scene from a Scene or a JSON-format dict, checking only shapes and finite poses (see module docstring)."""
    if isinstance(scene, Scene):
        return scene
    if not isinstance(scene, dict) or not isinstance(scene.get("objects"), list):
        raise ValueError('a scene must be a Scene or {"objects": [...]}; got ' + repr(scene)[:200])
    objects = []
    for i, o in enumerate(scene["objects"]):
        if not isinstance(o, dict) or o.get("shape") not in SHAPES:
            raise ValueError(f"object {i}: unknown or missing shape in {o!r}; known shapes: {', '.join(SHAPES)}")
        try:
            (x, y), yaw = (float(v) for v in o["position"]), float(o["yaw"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"object {i}: need position [x, y] and yaw as numbers, got {o!r}") from err
        if not all(math.isfinite(v) for v in (x, y, yaw)):
            raise ValueError(f"object {i} ({o['shape']}): position and yaw must be finite, got {o!r}")
        objects.append(TableObject(o["shape"], (x, y), yaw))
    return Scene(tuple(objects))


def _pair(t: TableObject, p: TableObject, ti: int, pi: int, distance: float) -> MatchedPair:
    yaw_error = None
    if t.shape == p.shape and YAW_PERIOD[t.shape] != 0.0:
        yaw_error = math.degrees(yaw_distance(t.shape, t.yaw, p.yaw))
    return MatchedPair(ti, pi, t.shape, p.shape, 1000.0 * distance, yaw_error)


def match_scene(pred: Scene | dict, true: Scene | dict, settings: MatchSettings | None = None) -> SceneMatch:
    """Hungarian matching of `pred`'s objects to `true`'s on table-plane distance, pairs beyond the gate dropped.

    Pairs beyond the gate cost more than any gated pair, so the assignment first maximises the number of pairs
    within the gate and then minimises their total distance.
    """
    gate = (settings or MatchSettings()).gate
    pred, true = as_scene(pred), as_scene(true)
    if not pred.objects or not true.objects:
        return SceneMatch(len(true.objects), len(pred.objects), ())
    t_xy = np.array([o.position for o in true.objects])  # (Nt, 2) metres
    p_xy = np.array([o.position for o in pred.objects])  # (Np, 2) metres
    distance = np.linalg.norm(t_xy[:, None] - p_xy[None], axis=-1)  # (Nt, Np)
    cost = np.where(distance <= gate, distance, gate * (1 + distance.size))  # one outside pair > all inside
    rows, cols = linear_sum_assignment(cost)
    pairs = tuple(
        _pair(true.objects[i], pred.objects[j], int(i), int(j), float(distance[i, j]))
        for i, j in zip(rows, cols)
        if distance[i, j] <= gate
    )
    return SceneMatch(len(true.objects), len(pred.objects), pairs)


def _stats(values: list[float], name: str) -> dict:
    """Median and mean of `values` (None when empty), keyed `{name}_median` and `{name}_mean`."""
    if not values:
        return {f"{name}_median": None, f"{name}_mean": None}
    return {f"{name}_median": float(np.median(values)), f"{name}_mean": float(np.mean(values))}


def summarize(matches: Sequence[SceneMatch]) -> dict:
    """Aggregate scene matches into the comparison table's numbers.

    Returns a JSON-ready dict: count_acc, identity_acc (over matched pairs), recall (matched / true objects),
    precision (matched / predicted objects), position_error_mm_{median,mean}, yaw_error_deg_{median,mean}, the
    same yaw statistics per shape with a yaw (`yaw_error_deg_median_by_shape`), and the counts behind them.
    Rates over an empty set are None.
    """
    pairs = [p for m in matches for p in m.pairs]
    n_true, n_pred = sum(m.n_true for m in matches), sum(m.n_pred for m in matches)
    yaw = [(p.true_shape, p.yaw_error_deg) for p in pairs if p.yaw_error_deg is not None]
    by_shape = {s: float(np.median([e for t, e in yaw if t == s])) for s in SHAPES if any(t == s for t, _ in yaw)}
    return {
        "n_scenes": len(matches),
        "n_true": n_true,
        "n_pred": n_pred,
        "n_matched": len(pairs),
        "n_yaw": len(yaw),
        "count_acc": float(np.mean([m.n_pred == m.n_true for m in matches])) if matches else None,
        "identity_acc": float(np.mean([p.true_shape == p.pred_shape for p in pairs])) if pairs else None,
        "recall": len(pairs) / n_true if n_true else None,
        "precision": len(pairs) / n_pred if n_pred else None,
        **_stats([p.position_error_mm for p in pairs], "position_error_mm"),
        **_stats([e for _, e in yaw], "yaw_error_deg"),
        "yaw_error_deg_median_by_shape": by_shape,
    }


def evaluate_method(
    predict: Callable[[torch.Tensor], Sequence[Scene | dict]],
    images: torch.Tensor,
    truths: Sequence[Scene | dict],
    batch_size: int = 256,
    settings: MatchSettings | None = None,
) -> dict:
    """Run `predict` over `images` in batches, match, summarise and time it.

    Args:
        predict: images FloatTensor (b, 3, H, W) in [0, 1] -> b scenes (Scene or JSON-format dicts).
        images: FloatTensor (B, 3, H, W) in [0, 1], the held-out renders.
        truths: the B true scenes.
    Returns:
        `summarize`'s dict plus images_per_s (prediction time only, matching excluded).
    """
    if images.dim() != 4 or images.shape[1] != 3 or len(truths) != images.shape[0]:
        raise ValueError(f"need images (B, 3, H, W) and B true scenes; got {tuple(images.shape)}, {len(truths)}")
    preds: list[Scene | dict] = []
    start = time.perf_counter()
    for i in range(0, len(truths), batch_size):
        preds.extend(predict(images[i : i + batch_size]))
    elapsed = time.perf_counter() - start
    if len(preds) != len(truths):
        raise ValueError(f"predict returned {len(preds)} scenes for {len(truths)} images")
    summary = summarize([match_scene(p, t, settings) for p, t in zip(preds, truths)])
    return {**summary, "images_per_s": len(truths) / elapsed if elapsed > 0 else None}
