"""Evaluation shared by every 3D method (3D AIR, the supervised regressor, any refinement of either).

Predicted objects are matched to true ones by the Hungarian algorithm on their distance on the table plane; a
pair further apart than `MatchSettings.gate` metres counts as unmatched (a missed true object plus a spurious
prediction), whatever the assignment paired it with. Over the matched pairs:

- identity accuracy: the shapes agree;
- position error: distance on the table plane, in millimetres;
- yaw error: `WorldObject.yaw_distance` (the smallest rotation modulo the object's yaw symmetry, from its World),
  in degrees, over pairs whose identity is right and whose object has a yaw at all (spheres and upright cylinders,
  symmetric under any yaw, are excluded). A wrongly identified object has no well-defined yaw error: the two
  objects' symmetries differ.
- MSSD (BOP's maximum symmetry-aware surface distance, Hodan et al. 2020), in millimetres, over pairs whose
  identity is right: the largest distance between a mesh vertex under the predicted pose and under the true pose,
  minimised over the object's symmetric yaws (yaw + k * period). An object symmetric under any yaw (period 0) is
  its own image under every turn, so there the minimum is at a turn that cancels the yaw difference and MSSD is
  the distance of the pose origins (exact for a solid of revolution; for its tessellated mesh the omitted turn
  moves vertices by less than the facets' size).

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
from scenes.tabletop_objects import SHAPES
from scenes.world import World

__all__ = [
    "breakdown",
    "mssd",
    "match_gate",
    "MatchSettings",
    "MatchedPair",
    "SceneMatch",
    "as_scene",
    "match_scene",
    "summarize",
    "evaluate_method",
]


@dataclass(frozen=True)
class MatchSettings:
    """How predictions are paired with true objects."""

    # metres: half the closest possible centre distance of two sampled objects (two boxes side by side, 0.07 m
    # wide plus tabletop.MIN_GAP, are 0.08 m apart), so one prediction can never be near two true objects, and
    # about half an object's size, so a prediction this far off has not found the object
    # None: 0.04 m for the primitives world; for another World `match_gate(world)`, by the same reasoning
    gate: float | None = None


def match_gate(world: World) -> float:
    """Metres: half the closest two sampled centres can come (the narrowest footprint's width plus min_gap): 0.04
    for the primitives world's box (0.07 m wide + 0.01 m)."""
    widths = []
    for obj in world.objects:
        angles = np.linspace(0, math.pi, 36, endpoint=False)
        widths.append(min(float(np.ptp(obj.footprint @ np.array([math.cos(a), math.sin(a)]))) for a in angles))
    return (min(widths) + world.min_gap) / 2


def _world(world: World | None) -> World:
    from inverse_graphics.tabletop.world3d import primitives

    return world or primitives()


def mssd(vertices: np.ndarray, period: float, true_pose: tuple[float, float, float],
         pred_pose: tuple[float, float, float]) -> float:  # fmt: skip
    """BOP's MSSD in the mesh's units: max over `vertices` (V, 3) of the distance between the vertex under the
    predicted pose and under the true one, minimised over the symmetric yaws true_yaw + k * period (period 0:
    any yaw, so the yaw difference is cancelled exactly; 2 pi: none). Poses are (x, y, yaw)."""
    (tx, ty, tyaw), (px, py, pyaw) = true_pose, pred_pose
    v = np.asarray(vertices, dtype=np.float64)
    if period == 0.0:
        turns = [pyaw]  # the true pose's symmetric yaws include the predicted one
    else:
        m = max(round(2 * math.pi / period), 1)
        turns = [tyaw + k * 2 * math.pi / m for k in range(m)]

    def posed(yaw: float, x: float, y: float) -> np.ndarray:
        c, s = math.cos(yaw), math.sin(yaw)
        return v @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T + np.array([x, y, 0.0])

    pred = posed(pyaw, px, py)
    return min(float(np.linalg.norm(pred - posed(t, tx, ty), axis=1).max()) for t in turns)


@dataclass(frozen=True)
class MatchedPair:
    """One predicted object paired with one true object."""

    true_index: int  # index into the true scene's objects
    pred_index: int  # index into the predicted scene's objects
    true_shape: str
    pred_shape: str
    position_error_mm: float  # table-plane distance, millimetres
    yaw_error_deg: float | None  # symmetry-reduced, degrees; None if the shapes differ or yaw is meaningless
    mssd_mm: float | None = None  # BOP's MSSD, millimetres; None if the shapes differ


@dataclass(frozen=True)
class SceneMatch:
    """The matching of one predicted scene to its true scene."""

    n_true: int
    n_pred: int
    pairs: tuple[MatchedPair, ...]
    true_shapes: tuple[str, ...] = ()  # every true object's shape, in the true scene's order
    pred_shapes: tuple[str, ...] = ()  # every predicted object's


def as_scene(scene: Scene | dict, world: World | None = None) -> Scene:
    """A Scene from a Scene or a JSON-format dict, checking only shapes (the world's; None: the primitives) and
    finite poses (see module docstring)."""
    if isinstance(scene, Scene):
        return scene
    if not isinstance(scene, dict) or not isinstance(scene.get("objects"), list):
        raise ValueError('a scene must be a Scene or {"objects": [...]}; got ' + repr(scene)[:200])
    names = SHAPES if world is None else world.shape_names
    objects = []
    for i, o in enumerate(scene["objects"]):
        if not isinstance(o, dict) or o.get("shape") not in names:
            raise ValueError(f"object {i}: unknown or missing shape in {o!r}; known shapes: {', '.join(names)}")
        try:
            (x, y), yaw = (float(v) for v in o["position"]), float(o["yaw"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"object {i}: need position [x, y] and yaw as numbers, got {o!r}") from err
        if not all(math.isfinite(v) for v in (x, y, yaw)):
            raise ValueError(f"object {i} ({o['shape']}): position and yaw must be finite, got {o!r}")
        objects.append(TableObject(o["shape"], (x, y), yaw))
    return Scene(tuple(objects))


def _pair(world: World, t: TableObject, p: TableObject, ti: int, pi: int, distance: float) -> MatchedPair:
    yaw_error = surface = None
    if t.shape == p.shape:
        obj = world.object_named(t.shape)
        if obj.yaw_period != 0.0:
            yaw_error = math.degrees(obj.yaw_distance(t.yaw, p.yaw))
        true_pose, pred_pose = (*t.position, t.yaw), (*p.position, p.yaw)
        surface = 1000.0 * mssd(obj.mesh.vertices, obj.yaw_period, true_pose, pred_pose)  # type: ignore[arg-type]
    return MatchedPair(ti, pi, t.shape, p.shape, 1000.0 * distance, yaw_error, surface)


def match_scene(
    pred: Scene | dict, true: Scene | dict, settings: MatchSettings | None = None, world: World | None = None
) -> SceneMatch:
    """Hungarian matching of `pred`'s objects to `true`'s on table-plane distance, pairs beyond the gate dropped.

    Pairs beyond the gate cost more than any gated pair, so the assignment first maximises the number of pairs
    within the gate and then minimises their total distance. world: the scenes' World (None: the primitives).
    """
    gate = (settings or MatchSettings()).gate
    if gate is None:
        gate = 0.04 if world is None else match_gate(world)
    w = _world(world)
    pred, true = as_scene(pred, world), as_scene(true, world)
    shapes = tuple(o.shape for o in true.objects), tuple(o.shape for o in pred.objects)
    if not pred.objects or not true.objects:
        return SceneMatch(len(true.objects), len(pred.objects), (), *shapes)
    t_xy = np.array([o.position for o in true.objects])  # (Nt, 2) metres
    p_xy = np.array([o.position for o in pred.objects])  # (Np, 2) metres
    distance = np.linalg.norm(t_xy[:, None] - p_xy[None], axis=-1)  # (Nt, Np)
    cost = np.where(distance <= gate, distance, gate * (1 + distance.size))  # one outside pair > all inside
    rows, cols = linear_sum_assignment(cost)
    pairs = tuple(
        _pair(w, true.objects[i], pred.objects[j], int(i), int(j), float(distance[i, j]))
        for i, j in zip(rows, cols)
        if distance[i, j] <= gate
    )
    return SceneMatch(len(true.objects), len(pred.objects), pairs, *shapes)


def _stats(values: list[float], name: str) -> dict:
    """Median and mean of `values` (None when empty), keyed `{name}_median` and `{name}_mean`."""
    if not values:
        return {f"{name}_median": None, f"{name}_mean": None}
    return {f"{name}_median": float(np.median(values)), f"{name}_mean": float(np.mean(values))}


def summarize(matches: Sequence[SceneMatch], world: World | None = None) -> dict:
    """Aggregate scene matches into the comparison table's numbers.

    Returns a JSON-ready dict: count_acc, identity_acc (over matched pairs), recall (matched / true objects),
    precision (matched / predicted objects), position_error_mm_{median,mean}, yaw_error_deg_{median,mean}, the
    same yaw statistics per shape with a yaw (`yaw_error_deg_median_by_shape`), and the counts behind them.
    Rates over an empty set are None.
    """
    pairs = [p for m in matches for p in m.pairs]
    n_true, n_pred = sum(m.n_true for m in matches), sum(m.n_pred for m in matches)
    yaw = [(p.true_shape, p.yaw_error_deg) for p in pairs if p.yaw_error_deg is not None]
    names = _world(world).shape_names
    by_shape = {s: float(np.median([e for t, e in yaw if t == s])) for s in names if any(t == s for t, _ in yaw)}
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
        **_stats([p.mssd_mm for p in pairs if p.mssd_mm is not None], "mssd_mm"),
        "yaw_error_deg_median_by_shape": by_shape,
        "by_shape": breakdown(matches, names),
        "count_confusion": _confusion(matches),
    }


def breakdown(matches: Sequence[SceneMatch], names: Sequence[str]) -> dict:
    """Per true shape: {"true", "missed" (no prediction within the gate), "unmatched_predictions" (predictions of
    that shape matched to nothing), "wrong_identity" (matched, another shape predicted), "position_error_mm_median"
    (its matched objects')}: where a method's errors are."""
    out = {}
    found = {(i, p.true_index) for i, m in enumerate(matches) for p in m.pairs}
    used = {(i, p.pred_index) for i, m in enumerate(matches) for p in m.pairs}
    for name in names:
        matched = [p for m in matches for p in m.pairs if p.true_shape == name]
        true = [(i, j) for i, m in enumerate(matches) for j, s in enumerate(m.true_shapes) if s == name]
        pred = [(i, j) for i, m in enumerate(matches) for j, s in enumerate(m.pred_shapes) if s == name]
        errors = [p.position_error_mm for p in matched]
        out[name] = {
            "true": len(true),
            "missed": sum(k not in found for k in true),
            "unmatched_predictions": sum(k not in used for k in pred),
            "wrong_identity": sum(p.pred_shape != name for p in matched),
            "position_error_mm_median": float(np.median(errors)) if errors else None,
        }
    return out


def _confusion(matches: Sequence[SceneMatch]) -> dict:
    """{true count: {predicted count: scenes}} (JSON keys: strings)."""
    out: dict = {}
    for m in matches:
        row = out.setdefault(str(m.n_true), {})
        row[str(m.n_pred)] = row.get(str(m.n_pred), 0) + 1
    return out


def evaluate_method(
    predict: Callable[[torch.Tensor], Sequence[Scene | dict]],
    images: torch.Tensor,
    truths: Sequence[Scene | dict],
    batch_size: int = 256,
    settings: MatchSettings | None = None,
    world: World | None = None,
) -> dict:
    """Run `predict` over `images` in batches, match, summarise and time it.

    Args:
        predict: images FloatTensor (b, 3, H, W) in [0, 1] -> b scenes (Scene or JSON-format dicts).
        images: FloatTensor (B, 3, H, W) in [0, 1], the held-out renders.
        truths: the B true scenes.
        world: the scenes' World (None: the primitives world): names, symmetries, meshes for MSSD, the gate.
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
    summary = summarize([match_scene(p, t, settings, world) for p, t in zip(preds, truths)], world)
    return {**summary, "images_per_s": len(truths) / elapsed if elapsed > 0 else None}
