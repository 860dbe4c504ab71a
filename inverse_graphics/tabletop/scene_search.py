"""Render-and-compare search over a scene's structure: objects added where the image is unexplained, removed where
the render is not in the image.

Refinement (`refine`) polishes poses and keeps counts and identities. A guide that missed an object, drew one
twice or put one where there is only table leaves a residual that no pose change removes. This search asks the
generative model instead, one move per scene per round, each kept only when the image says so:

- remove: every object of the scene is taken out in turn (one render each); the object whose removal the image
  supports most is removed. An object the image cannot see (its own signal at most MIN_SIGNAL: it could not be
  added either) is removed first, and in a scene whose footprints interpenetrate (which the world never draws) one
  of the interpenetrating objects, the one the image supports least, is removed whatever the test says.
- swap: an object whose silhouette leaves more than `margin` of its own signal unexplained is tried as every other
  object of the world at its place, the middles of their surfaces together (an L bracket's frame origin can be its
  corner), at `yaws` turns and at its own yaw; the best, refined by LM, is kept when the image favours it over the
  object it replaces: the test below with `swap_margin` (0, the likelihood ratio of the two). A swap leaves the count
  as it is, so the margin that keeps half-right objects out has no work to do there, and with it a wrong object of
  another colour stayed: its albedo fitted towards the image's colour took up the losses' difference, while the
  yardstick, the two objects' difference in their nominal colours, stayed large (on an unseen world's 96 scenes, blue
  blocks kept as grey nuts or green brackets: identity 97.0% clean, 84.5% under JPEG with the margin, 99.6% and 98.7%
  without; benchmarks/results/search_probe_swap.notes.md).
- turn: in a scene the round has not moved, each object with a symmetry period is tried at turns of 45 degrees (2 pi /
  `turn_yaws`) about its place, those a turn short of its period (a mug at 7, a box at 3, a cube at 1); the
  `turn_candidates` best-fitting turns of each are refined by LM (alone, the others held), and the best that the image
  favours by the test with `swap_margin` (the count does not change, as in a swap) and that LM did not bring back to
  the object's own yaw is kept. The pose fit does not cross a mug's body to move its handle, and seen from above the
  handle is a sliver in front of the body that no unfitted turn lines up with: with the best of 4 unfitted turns kept
  by the add move's margin, the median mug on 48 kitchen scenes was left 51-116 degrees off in each of five
  conditions; turned and fitted, 1.2-4.8 degrees (benchmarks/results/search_probe_turn_fitted.notes.md).
- add: in each of the `regions` connected regions of large residual (observed minus render, box-averaged over a few
  pixels so that pixel noise and compression blocks fall away, squared, summed over channels, where the render shows
  the table: a missing object's pixels are there, while a light or colour the render does not model leaves its largest
  misfits on the objects already drawn, which can outweigh a thin or faint object's residual; pixels above a quarter
  of the peak of that residual averaged over a window of about an object's size) that hold the most residual (and a
  long region's two ends, each the piece of it within that window: two thin objects touching make one bent region
  whose centroid and axis fit neither), every object of the world is tried on the ray through the region's
  residual-weighted centroid, where it meets half and the full height of the object (the middle of an object's image
  is its middle seen from the side, nearer its top seen from above), with the middle of its surface there (not its
  frame's origin: a spatula's is 2 cm along its handle), at `yaws` turns across its symmetry period and, for an
  elongated object, with its long axis along the region's, centred on it and shifted a third of its length either way
  (an object mostly hidden behind another shows only one end: a spatula's handle beside a box; 227 of the probe's 240
  kitchen counts, from 226: benchmarks/results/search_probe_shifted_ends.notes.md); `refine_candidates` of them (by
  image loss: the best of each region, then the best of each other object in a region, then any; a region's trials of
  one object differ little; on 48 kitchen scenes in five conditions 224 of 240 counts right, against 217 with the best
  three of all placed by their origins: benchmarks/results/search_probe_diverse.notes.md) are refined by
  Levenberg-Marquardt, each alone (the scene's other objects held: under JPEG or noise their edges' misfits can pull a
  joint fit's steps off the new object, a thin one especially, and LM then keeps the start; after the search,
  refinement polishes each changed scene's objects together), and the best of those that passes the test is the
  scene's proposal. A swapped object is fitted alone likewise.

The test, for a move between a scene without an object (render b) and with it (render a), observed image x: keep the
object iff ||x - b||^2 - ||x - a||^2 >= margin ||a - b||^2, i.e. the image is closer to the render with the object
than to the one without by at least `margin` times the object's own signal (the losses on renders as compared with
the image, appearance fitted; the signal on renders with the objects' nominal albedo: measured with the fitted
albedo, an added object's signal would shrink with its contrast, and an object taking the table's colour would
explain misfits of the table itself (a tint, a camera slightly off) at little cost: spurious objects on the
demo's randomised scenes). margin 0 is the likelihood ratio test of the two scenes under Gaussian pixel noise
with equal priors; a positive margin asks that an object explain more than (1 + margin) / 2 of its pixels' change
(0.25: 62.5%), so that an object only half right, or one that only mends the edges of a misfit, is not added. Adding
and removing apply the same test, so a scene cannot cycle. Footprints may not interpenetrate, as the world's sampler
refuses them: an addition that would is tried first with the objects it meets turned clear of it about their
places (each to the best-fitting of `yaws` turns that clears every footprint: a mug drawn with its handle the
wrong way round reaches into its neighbour's), then as a relocation, the objects it meets removed, the same test
applied to either result (one object drawn between two of its kind gives way to one of them; the next round adds
the other). Turning clear found 226 of the probe's 240 counts, from 224 (benchmarks/results/search_probe_turned.md).
Nor is an object added nearer the table's edge than half the world's `min_gap`, which its sampler keeps: a camera
fitted a few millimetres off leaves a line of residual along the edge, which a thin object clamped against it would
explain (the demo's first kitchen scene got a spatula there; on the probe, 226 of 240 either way).

Scenes are searched independently (batched), for up to `rounds` rounds each, and a scene stops at the first round
that moves nothing. The cost per scene and round is about n + 2 S (yaws + 2) `regions` renders (each two with a
fitted albedo: the coded render of each pixel's object) plus `refine_candidates` short LM fits, and for each
doubtful object S x (yaws + 1) renders and one fit (n objects in the scene, S in the world): most of `infer`'s
time on a world of several objects. The add move's trial placements, most of those renders, can be ranked by a
`Screen` instead: refinement's draws each trial only in a window about the added object (OpenGL): on kitchen
scenes `infer` is then 1.6-2.2x faster an image (benchmarks/results/search_speed.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from inverse_graphics.tabletop import world3d
from scenes.tabletop_objects import footprints_overlap
from scenes.world import SceneTensors, World

__all__ = ["SearchConfig", "search_scenes", "table_points"]

MIN_SIGNAL = 1.0  # an object whose render changes the image by less (squared, summed; ~4 pixels of an object
# against the table) is not seen, so not added (e.g. a copy of an object already there)


@dataclass(frozen=True)
class SearchConfig:
    """How the structure search moves (module docstring)."""

    rounds: int = 6  # moves per scene at most (each round: one removal or none, one addition or none)
    margin: float = 0.25  # the share of its own signal an object must explain beyond half (module docstring)
    yaws: int = 4  # trial turns of an added object across its symmetry period (1 for a yaw-invariant one)
    heights: tuple[float, ...] = (0.5, 1.0)  # where along the residual's ray an added object is tried: the ray's
    # points at these fractions of the object's height (its image's middle is its middle seen from the side, nearer
    # its top seen from above)
    regions: int = 3  # the add move's proposals: the connected regions of unexplained image holding the most
    # residual, at most this many per scene (a missing object's need not be the largest: under a light or colours
    # the render does not model, the residual on objects already there can outweigh it)
    refine_candidates: int = 4  # the best trial additions per scene (over its regions) refined by LM before the choice
    lm_steps: int = 4  # LM iterations of each refined addition
    # swap: an object whose silhouette leaves more than `margin` of its own signal unexplained is tried as every
    # other object of the world at its place (grid yaws and its own), the best refined by LM and kept by the same
    # test with `swap_margin` (the image must favour the new object over the old)
    swap: bool = True
    swap_margin: float = 0.0  # the swap's test margin (module docstring: the count does not change)
    # turn: in a round that has moved nothing else in the scene, each object that has a symmetry period is tried at
    # its other `turn_yaws` turns of it about its place (a mug whose handle the guide drew on the wrong side: the
    # pose fit does not cross the body), the best of each refined by LM and kept by the test with `swap_margin`
    turn: bool = True
    turn_yaws: int = 8  # turns a full circle is divided into (45 degrees each): an object is tried at those short of
    # its period by a step (a mug at 7, a box at 3, a cube at 1 turn of 45 degrees; a hexagonal prism at none)
    turn_candidates: int = 3  # the best-fitting turns of each object that LM refines

    def __post_init__(self) -> None:
        counts = (self.yaws, self.regions, self.refine_candidates, self.turn_candidates)
        if self.rounds < 0 or self.lm_steps < 0 or min(counts) < 1 or self.turn_yaws < 2:
            raise ValueError(
                "need rounds, lm_steps >= 0, yaws, regions, refine_candidates, turn_candidates >= 1, turn_yaws >= 2, "
                f"got {self}"
            )
        if not (0.0 <= self.margin < 1.0 and 0.0 <= self.swap_margin < 1.0):
            raise ValueError(f"margin and swap_margin must be in [0, 1), got {self.margin}, {self.swap_margin}")


Renderer = Callable[[SceneTensors, torch.Tensor], torch.Tensor]  # (scenes, their rows of the batch) -> (M, 2, 3, H, W)
# renders: [:, 0] as compared with the image (gain and any fitted albedo applied), [:, 1] with the objects' nominal
# albedo (what an object's own signal, the test's yardstick, is measured by)
Fit = Callable[[SceneTensors, torch.Tensor, torch.Tensor], SceneTensors]  # LM refinement of the pose of one object
# (the slots given) in each of the scenes (with their rows), the others held
Screen = Callable[[SceneTensors, torch.Tensor, torch.Tensor], torch.Tensor]  # (trial scenes, their rows, the slot
# each trial added an object in) -> (M,) their image losses, as `Renderer`'s [:, 0] would give them or close: the
# add move ranks its many trials by it, and only the few it refines are rendered whole
Drawn = Callable[[SceneTensors, torch.Tensor], torch.Tensor]  # (scenes, their rows) -> BoolTensor (M, H, W), the
# pixels where an object is drawn (the rest shows the table)


def table_points(world: World, pixels: torch.Tensor, height: float, size: tuple[int, int]) -> torch.Tensor:
    """(M, 2) table positions (metres) whose point `height` above the table projects to `pixels` (M, 2): continuous
    (u, v) from the image's top left, in an image of `size` (W, H) seen by the world's camera."""
    from renderers.opengl import world_to_clip

    m = np.linalg.inv(world_to_clip(world.camera.renderer_camera(size), size).astype(np.float64))
    W, H = size
    uv = pixels.detach().cpu().double().numpy()
    ndc = np.stack([2 * uv[:, 0] / W - 1, 1 - 2 * uv[:, 1] / H], 1)
    ends = []
    for depth in (-1.0, 1.0):  # the ray's points on the near and the far plane
        clip = np.concatenate([ndc, np.full((len(ndc), 1), depth), np.ones((len(ndc), 1))], 1)
        p = clip @ m.T
        ends.append(p[:, :3] / p[:, 3:])
    near, far = ends
    s = (height - near[:, 2]) / np.where(np.abs(far[:, 2] - near[:, 2]) > 1e-12, far[:, 2] - near[:, 2], 1e-12)
    xy = near[:, :2] + s[:, None] * (far[:, :2] - near[:, :2])
    return torch.as_tensor(xy, dtype=torch.float32, device=pixels.device)


def _loss(rendered: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return ((rendered - images) ** 2).flatten(1).sum(1)


def _explained(
    with_: torch.Tensor, without: torch.Tensor, images: torch.Tensor, margin: float, adding: bool = False
) -> torch.Tensor:
    """(M,) how far the image favours `with_` over `without` (renders (M, 2, 3, H, W) as `Renderer` returns them),
    in units of the difference's own energy as the world draws it: >= 0 keeps the object (module docstring's
    test). An object to be added must also show (MIN_SIGNAL; the removal move removes one that does not)."""
    signal = ((with_[:, 1] - without[:, 1]) ** 2).flatten(1).sum(1)
    score = (_loss(without[:, 0], images) - _loss(with_[:, 0], images) - margin * signal) / signal.clamp(min=1e-12)
    if adding:
        score = torch.where(signal > MIN_SIGNAL, score, torch.full_like(score, -1.0))
    return score


def _clashes(world: World, t: SceneTensors, slot: int, row: int = 0) -> list[int]:
    """The slots of scene `row` whose objects interpenetrate object `slot`."""
    ids, pos, yaw = t.shape_ids[row].tolist(), t.positions[row].tolist(), t.yaws[row].tolist()
    polygon = world.objects[ids[slot]].footprint_at(tuple(pos[slot]), yaw[slot])
    return [
        j
        for j in range(len(ids))
        if j != slot
        and ids[j] >= 0
        and footprints_overlap(polygon, world.objects[ids[j]].footprint_at(tuple(pos[j]), yaw[j]))
    ]


def _at_edge(world: World, t: SceneTensors, row: int, slot: int) -> bool:
    """Whether object `slot` of scene `row` comes nearer the table's edge than half the world's min_gap."""
    obj = world.objects[int(t.shape_ids[row, slot])]
    polygon = obj.footprint_at(tuple(t.positions[row, slot].tolist()), float(t.yaws[row, slot]))
    return not world.inside_table(polygon, 0.5 * world.min_gap)


def _overlaps(world: World, t: SceneTensors, row: int, slot: int) -> bool:
    """Whether object `slot` of scene `row` interpenetrates another object of that scene."""
    return bool(_clashes(world, t, slot, row))


def _with_slots(t: SceneTensors, n: int) -> SceneTensors:
    """`t` with at least n slots (empty ones appended)."""
    extra = n - t.shape_ids.shape[1]
    if extra <= 0:
        return t
    B = t.shape_ids.shape[0]
    return SceneTensors(
        torch.cat([t.shape_ids, t.shape_ids.new_full((B, extra), -1)], 1),
        torch.cat([t.positions, t.positions.new_zeros(B, extra, 2)], 1),
        torch.cat([t.yaws, t.yaws.new_zeros(B, extra)], 1),
    )


def _put(t: SceneTensors, rows: torch.Tensor, new: SceneTensors) -> None:
    t.shape_ids[rows], t.positions[rows], t.yaws[rows] = new.shape_ids, new.positions, new.yaws


def search_scenes(
    world: World,
    t: SceneTensors,
    images: torch.Tensor,
    render: Renderer,
    fit: Fit,
    cfg: SearchConfig | None = None,
    screen: Screen | None = None,
    drawn: Drawn | None = None,
) -> SceneTensors:
    """The structure search of the module docstring from scenes `t` (B, N) against `images` (B, 3, H, W).

    Args:
        world: the scenes' World (objects, table, camera, count range).
        t: the start (e.g. the guide's scenes after pose refinement).
        images: the observed images.
        render: renders scenes given as rows of the batch (so that per-image appearance can be applied): the
            `Renderer` pair, as compared with `images` and with nominal albedo.
        fit: refines the poses of scenes given as rows of the batch (LM), returning them.
        cfg: the search's settings.
        screen: the add move's trial losses (e.g. drawn only about the added object); None: `render`'s.
        drawn: the pixels the scenes' objects cover; the add move then looks for unexplained image only where the
            render shows the table. None: everywhere.
    Returns:
        SceneTensors (B, N') with N' >= N slots (as many as the world's largest count when objects were added).
    """
    cfg = cfg or SearchConfig()
    B = images.shape[0]
    most = world.objects_per_scene[1]
    t = _with_slots(SceneTensors(t.shape_ids.clone(), t.positions.clone(), t.yaws.clone()), most)
    size = (int(images.shape[3]), int(images.shape[2]))
    window = _window(world, size)
    tops = [float(o.mesh.bounds[1, 2]) for o in world.objects]  # metres
    middles = torch.tensor(np.array([o.mesh.centroid[:2] for o in world.objects]), dtype=torch.float32)
    axis_angle, elongated = _long_axes(world)
    lengths = [_length_along(o, a) for o, a in zip(world.objects, axis_angle)]
    active = torch.arange(B)
    current = render(t, torch.arange(B))  # (B, 2, 3, H, W)
    for _ in range(cfg.rounds):
        if len(active) == 0:
            break
        moved = torch.zeros(B, dtype=torch.bool)
        # -- remove: each object of each active scene out in turn
        rows, slots = (t.shape_ids[active] >= 0).nonzero(as_tuple=True)
        if len(rows):
            scene = active[rows]
            trial = world3d.rows_of(t, scene)
            trial.shape_ids[torch.arange(len(scene)), slots] = -1
            without = render(trial, scene)
            score = _explained(current[scene], without, images[scene], cfg.margin)  # < 0: remove
            # the share of each object's own signal that its silhouette leaves unexplained (for the swap below)
            change = ((current[scene, 1] - without[:, 1]) ** 2).sum(1)  # (M, H, W)
            signal = change.flatten(1).sum(1)  # (M,) each object's own signal
            residual = ((images[scene] - current[scene, 0]) ** 2).sum(1)
            unexplained = (residual * (change > 1e-6)).flatten(1).sum(1) / signal.clamp(min=1e-12)
            # an object the image cannot see (signal <= MIN_SIGNAL: it could not be added either) goes first
            score = torch.where(signal > MIN_SIGNAL, score, torch.full_like(score, -1.0))
            for b in scene.unique().tolist():
                mine = (scene == b).nonzero(as_tuple=True)[0]
                # objects that interpenetrate another: a scene the world never draws, so one of them goes
                clash = torch.tensor([_overlaps(world, t, b, int(slots[i])) for i in mine.tolist()], dtype=torch.bool)
                pool = mine[clash] if clash.any() else mine
                worst = pool[score[pool].argmin()]
                if score[worst] < 0 or clash.any():
                    t.shape_ids[b, slots[worst]] = -1
                    current[b] = without[worst]
                    moved[b] = True
            if cfg.swap and len(world.objects) > 1:
                doubtful = (unexplained > cfg.margin) & ~moved[scene]
                _swap(world, t, images, current, moved, scene[doubtful], slots[doubtful], render, fit, cfg, middles)
            if cfg.turn:
                _turn(world, t, images, current, moved, scene, slots, render, fit, cfg)
        # -- add: every object at the residual's peak, at `yaws` turns
        room = active[(t.shape_ids[active] >= 0).sum(1) < most]
        if len(room):
            # (R, 2) pixels and (R, 2) unit axes of the regions, R >= len(room); region_scene (R,) their scenes
            covered = None if drawn is None else drawn(world3d.rows_of(t, room), room)
            peak, axis, region_scene = _residual_regions(images[room], current[room, 0], window, cfg.regions, covered)
            region_scene = room[region_scene]
            cands: list[tuple[int, float, tuple[float | None, float], float]] = []  # (shape, height of the ray's
            # point, (yaw, 0) or (None, turn): along the region's axis, + turn, and a shift along that axis, metres)
            for s, obj in enumerate(world.objects):
                turns = [] if obj.yaw_period == 0.0 else [k * obj.yaw_period / cfg.yaws for k in range(cfg.yaws)]
                along: list[tuple[float | None, float]] = []
                if obj.yaw_period != 0.0 and elongated[s]:
                    along = [(None, 0.0), (None, math.pi)]
                for h in cfg.heights:
                    cands += [(s, h * tops[s], (y, 0.0), 0.0) for y in turns or [0.0]]
                    # along the region's axis: centred on it, and with the region as either end of the object (one
                    # partly hidden behind another shows only an end: a spatula's handle beside a box)
                    cands += [(s, h * tops[s], a, shift) for a in along
                              for shift in (0.0, lengths[s] / 3, -lengths[s] / 3)]  # fmt: skip
            C = len(cands)
            R = len(region_scene)
            shape = torch.tensor([c[0] for c in cands]).repeat(R)  # (R C,)
            owner = region_scene.repeat_interleave(C)  # (R C,) scene of each candidate
            points = {}  # (R, 2) table points of the region's centre and a pixel along its axis, per height
            for h in {c[1] for c in cands}:
                points[h] = (table_points(world, peak, h, size), table_points(world, peak + axis, h, size))
            xy = torch.stack([points[c[1]][0] for c in cands], 1)  # (R, C, 2)
            yaw = torch.empty(R, C)
            for j, (s_, h, (fixed, turn), shift) in enumerate(cands):
                if fixed is not None:
                    yaw[:, j] = fixed
                else:  # the object's long axis (at yaw 0: axis_angle[s]) turned onto the region's, on the table
                    d = points[h][1] - points[h][0]
                    yaw[:, j] = torch.atan2(d[:, 1], d[:, 0]) - axis_angle[s_] + turn
                    xy[:, j] = xy[:, j] + shift * F.normalize(d, dim=1)
            xy, yaw = xy.flatten(0, 1), yaw.flatten()
            # the object's own middle (its surface's centroid on the table plane), not its frame's origin, on the
            # region's: a spatula's blade puts it 2 cm along the handle, a miss for a thin object
            xy = xy - _turned(middles[shape], yaw)  # middles: (R C, 2) in the object's frame
            trial = world3d.rows_of(t, owner)
            slot = (trial.shape_ids < 0).int().argmax(1)  # the first empty slot
            ar = torch.arange(R * C)
            trial.shape_ids[ar, slot] = shape
            trial.positions[ar, slot] = xy
            trial.yaws[ar, slot] = yaw
            trial = SceneTensors(
                trial.shape_ids, world3d.clamp_to_table(world, trial.shape_ids, trial.positions, trial.yaws), trial.yaws
            )
            if screen is not None:
                loss = screen(trial, owner, slot)  # (R C,)
            else:
                loss = _loss(render(trial, owner)[:, 0], images[owner])
            # the scene's `refine_candidates` best trials, the best of each region first (losses of one image
            # compare): a region's trials differ little, and the best few of one would crowd out another's object
            region = torch.arange(R).repeat_interleave(C)  # (R C,) the region of each trial
            pick = torch.cat(
                [_diverse(loss[mine], region[mine], shape[mine], cfg.refine_candidates, mine)
                 for mine in ((owner == b).nonzero(as_tuple=True)[0] for b in room.tolist())]
            )  # fmt: skip
            chosen = world3d.rows_of(trial, pick)
            if cfg.lm_steps > 0:
                chosen = fit(chosen, owner[pick], slot[pick])
            with_ = render(chosen, owner[pick])
            score = _explained(with_, current[owner[pick]], images[owner[pick]], cfg.margin, adding=True)
            # nor at the table's very edge, where the world never draws one (its sampler keeps min_gap from it): a
            # camera fitted a little off leaves a line of residual there that a thin object would explain
            near = torch.tensor([_at_edge(world, chosen, k, int(slot[pick[k]])) for k in range(len(pick))])
            score = torch.where(near, torch.full_like(score, -1.0), score)
            for b in room.tolist():
                mine = (owner[pick] == b).nonzero(as_tuple=True)[0]
                for k in mine[score[mine].argsort(descending=True)].tolist():
                    if score[k] < 0:
                        break
                    candidate = world3d.rows_of(chosen, torch.tensor([k]))
                    added = int(slot[pick[k]])
                    rendered = with_[k]
                    if _overlaps(world, candidate, 0, added):
                        here = torch.tensor([b])
                        # the objects it interpenetrates turned clear of it (a mug drawn with its handle the wrong
                        # way round reaches into its neighbour's footprint), or else a relocation: they go (one
                        # drawn between two objects of its kind, say); either scene must pass the same test
                        turned = _turned_clear(world, candidate, added, render, here, images[b], cfg.yaws)
                        if turned is not None:
                            rendered = render(turned, here)[0]
                            if _explained(rendered[None], current[here], images[here], cfg.margin, True) >= 0:
                                candidate = turned
                        if candidate is not turned:
                            candidate.shape_ids[0, _clashes(world, candidate, added)] = -1
                            rendered = render(candidate, here)[0]
                            if _explained(rendered[None], current[here], images[here], cfg.margin, True) < 0:
                                continue
                    _put(t, torch.tensor([b]), candidate)
                    current[b] = rendered
                    moved[b] = True
                    break
        active = active[moved[active]]
    return t


def _turned_clear(
    world: World, t: SceneTensors, added: int, render: Renderer, row: torch.Tensor, image: torch.Tensor, yaws: int
) -> SceneTensors | None:
    """Scene `t` (one row) with each object that interpenetrates object `added` turned about its place to the yaw
    (of `yaws` turns across its symmetry period) that clears every other footprint and best fits `image`; None
    when one of them has no such yaw or cannot turn (any yaw looks the same)."""
    out = world3d.rows_of(t, torch.tensor([0]))
    for j in _clashes(world, out, added):
        period = world.objects[int(out.shape_ids[0, j])].yaw_period
        if period == 0.0:
            return None
        trials = []
        for turned in _other_turns(float(out.yaws[0, j]), period, yaws):
            trial = world3d.rows_of(out, torch.tensor([0]))
            trial.yaws[0, j] = turned
            if not _overlaps(world, trial, 0, j):
                trials.append(trial)
        if not trials:
            return None
        losses = [float(_loss(render(x, row)[:, 0], image[None])) for x in trials]
        out = trials[int(np.argmin(losses))]
    return out


def _other_turns(yaw: float, period: float, yaws: int) -> list[float]:
    """The yaws `yaw` + k period / yaws, k = 1 .. yaws - 1: an object's other turns across its symmetry period."""
    return [yaw + k * period / yaws for k in range(1, yaws)]


def _diverse(
    loss: torch.Tensor, region: torch.Tensor, shape: torch.Tensor, k: int, index: torch.Tensor
) -> torch.Tensor:
    """`index` of the k trials to refine, by ascending loss: the best of each region, then the best of each other
    object in a region already drawn from, then the next best of any (a region's trials of one object differ little,
    and the best few of one region or object would crowd out another's)."""
    order = loss.argsort().tolist()
    picked: list[int] = []
    for key in (lambda i: int(region[i]), lambda i: (int(region[i]), int(shape[i])), lambda i: i):
        seen = {key(i) for i in picked}
        for i in order:
            if len(picked) < k and i not in picked and key(i) not in seen:
                seen.add(key(i))
                picked.append(i)
    return index[torch.tensor(picked, dtype=torch.long)]


def _swap(
    world: World,
    t: SceneTensors,
    images: torch.Tensor,
    current: torch.Tensor,
    moved: torch.Tensor,
    scene: torch.Tensor,
    slots: torch.Tensor,
    render: Renderer,
    fit: Fit,
    cfg: SearchConfig,
    middles: torch.Tensor,
) -> None:
    """The swap move on objects (scene[i], slots[i]), in place: at most one per scene, the best the image favours.
    middles: FloatTensor (S, 2), each object's middle in its frame (the new object is put with its middle there)."""
    if len(scene) == 0:
        return
    owner: list[int] = []
    slot: list[int] = []
    shape: list[int] = []
    yaw: list[float] = []
    for b, j in zip(scene.tolist(), slots.tolist()):
        old = int(t.shape_ids[b, j])
        for s, obj in enumerate(world.objects):
            if s == old:
                continue
            turns = [] if obj.yaw_period == 0.0 else [k * obj.yaw_period / cfg.yaws for k in range(cfg.yaws)]
            for y in [float(t.yaws[b, j]), *turns]:
                owner.append(b)
                slot.append(j)
                shape.append(s)
                yaw.append(y)
    owner_t, slot_t = torch.tensor(owner), torch.tensor(slot)
    trial = world3d.rows_of(t, owner_t)
    ar = torch.arange(len(owner))
    # the new object's middle (its surface's centroid on the table) on the old one's, not its frame's origin on the
    # old origin: an L bracket's origin is its corner, 2.5 cm from its middle, a pen's its middle
    old_ids, new_ids = trial.shape_ids[ar, slot_t], torch.tensor(shape)
    new_yaw = torch.tensor(yaw, dtype=torch.float32)
    middle = trial.positions[ar, slot_t] + _turned(middles[old_ids], trial.yaws[ar, slot_t])
    trial.shape_ids[ar, slot_t] = new_ids
    trial.positions[ar, slot_t] = middle - _turned(middles[new_ids], new_yaw)
    trial.yaws[ar, slot_t] = new_yaw
    trial = SceneTensors(
        trial.shape_ids, world3d.clamp_to_table(world, trial.shape_ids, trial.positions, trial.yaws), trial.yaws
    )
    loss = _loss(render(trial, owner_t)[:, 0], images[owner_t])
    # the best trial of each doubtful object (its run of candidates), refined
    best: dict[tuple[int, int], int] = {}
    for i, k in enumerate(zip(owner, slot)):
        if k not in best or loss[i] < loss[best[k]]:
            best[k] = i
    pick = torch.tensor(list(best.values()))
    chosen = world3d.rows_of(trial, pick)
    if cfg.lm_steps > 0:
        chosen = fit(chosen, owner_t[pick], slot_t[pick])
    with_ = render(chosen, owner_t[pick])
    score = _explained(with_, current[owner_t[pick]], images[owner_t[pick]], cfg.swap_margin, adding=True)
    rows = pick.tolist()
    _keep_best(world, t, current, moved, chosen, [owner[i] for i in rows], [slot[i] for i in rows], with_, score)


def _turn(
    world: World,
    t: SceneTensors,
    images: torch.Tensor,
    current: torch.Tensor,
    moved: torch.Tensor,
    scene: torch.Tensor,
    slots: torch.Tensor,
    render: Renderer,
    fit: Fit,
    cfg: SearchConfig,
) -> None:
    """The turn move on objects (scene[i], slots[i]) of scenes not moved yet, in place: each object with a
    symmetry period at turns of 2 pi / `turn_yaws` about its place (those a turn short of its period); the
    `turn_candidates` best-fitting turns of each object refined by LM (alone, the others held), kept by the test
    with `swap_margin` when they landed on another yaw than the object's (by more than half a turn); at most one
    per scene, the best the image favours."""
    owner: list[int] = []
    slot: list[int] = []
    yaw: list[float] = []
    for b, j in zip(scene.tolist(), slots.tolist()):
        period = world.objects[int(t.shape_ids[b, j])].yaw_period
        if moved[b] or period == 0.0:
            continue
        step = 2 * math.pi / cfg.turn_yaws
        for k in range(1, int(period / step + 1e-6)):  # the turns at least a step short of the period
            turned = float(t.yaws[b, j]) + k * step
            owner.append(b)
            slot.append(j)
            yaw.append(turned)
    if not owner:
        return
    owner_t, slot_t = torch.tensor(owner), torch.tensor(slot)
    trial = world3d.rows_of(t, owner_t)
    trial.yaws[torch.arange(len(owner)), slot_t] = torch.tensor(yaw, dtype=torch.float32)
    loss = _loss(render(trial, owner_t)[:, 0], images[owner_t])
    runs: dict[tuple[int, int], list[int]] = {}  # each object's turns, best-fitting first
    for i in loss.argsort().tolist():
        runs.setdefault((owner[i], slot[i]), []).append(i)
    pick = torch.tensor([i for run in runs.values() for i in run[: cfg.turn_candidates]])
    chosen = world3d.rows_of(trial, pick)
    if cfg.lm_steps > 0:
        chosen = fit(chosen, owner_t[pick], slot_t[pick])
    with_ = render(chosen, owner_t[pick])
    score = _explained(with_, current[owner_t[pick]], images[owner_t[pick]], cfg.swap_margin, adding=True)
    for n, i in enumerate(pick.tolist()):  # a turn that LM brought back to the object's own yaw is no move
        b, j = owner[i], slot[i]
        period = world.objects[int(t.shape_ids[b, j])].yaw_period
        apart = float(chosen.yaws[n, j] - t.yaws[b, j]) % period
        if min(apart, period - apart) <= math.pi / cfg.turn_yaws:  # half a step
            score[n] = -1.0
    rows = pick.tolist()
    _keep_best(world, t, current, moved, chosen, [owner[i] for i in rows], [slot[i] for i in rows], with_, score,
               edge=True)  # fmt: skip


def _keep_best(
    world: World,
    t: SceneTensors,
    current: torch.Tensor,
    moved: torch.Tensor,
    trials: SceneTensors,
    owner: list[int],
    slot: list[int],
    rendered: torch.Tensor,
    score: torch.Tensor,
    edge: bool = False,
) -> None:
    """In place: into each scene not moved yet, the trial (a row of `trials`, changing object slot[i] of scene
    owner[i], rendered[i] its `Renderer` pair) with the best score that passes the test (>= 0) and interpenetrates
    nothing (nor, with `edge`, comes near the table's edge); at most one per scene."""
    for i in score.argsort(descending=True).tolist():
        b, j = owner[i], slot[i]
        if score[i] < 0:
            break
        if moved[b]:
            continue
        candidate = world3d.rows_of(trials, torch.tensor([i]))
        if _overlaps(world, candidate, 0, j) or (edge and _at_edge(world, candidate, 0, j)):
            continue
        _put(t, torch.tensor([b]), candidate)
        current[b] = rendered[i]
        moved[b] = True


def _window(world: World, size: tuple[int, int]) -> int:
    """The residual's smoothing window, pixels: about the typical object's projected size (odd, >= 3)."""
    pixels = world3d.derived_scales(world, size).glimpse_pixels / world3d.GLIMPSE_MARGIN
    return max(3, int(round(pixels / 2)) | 1)


def _preblur(window: int) -> int:
    """The box (odd, >= 3 pixels, a sixth of the smoothing window) that the signed residual is averaged over
    before it is squared for the add move's regions: pixel noise and JPEG's blocks lose most of their energy (a
    3 x 3 box keeps a ninth of white noise's), an object's solid patch keeps nearly all of its, and the two signed
    sides of a pose's edge misfit partly cancel."""
    return max(3, (window // 6) | 1)


def _long_axes(world: World) -> tuple[list[float], list[bool]]:
    """Each object's long axis on the table at yaw 0 (radians from x, by the principal axis of its mesh's vertices
    in x, y) and whether it is elongated (principal spreads differing by more than 1.5 x): an added elongated object
    is also tried with that axis along the residual region's."""
    angles, elongated = [], []
    for o in world.objects:
        xy = np.asarray(o.mesh.vertices, dtype=np.float64)[:, :2]
        values, vectors = np.linalg.eigh(np.cov((xy - xy.mean(0)).T))  # ascending
        angles.append(float(math.atan2(vectors[1, 1], vectors[0, 1])))
        elongated.append(bool(values[1] > 1.5**2 * max(values[0], 1e-12)))
    return angles, elongated


def _turned(xy: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Points (M, 2) of object frames turned by their objects' yaws (M,): where they lie relative to the origins."""
    cos, sin = torch.cos(yaw), torch.sin(yaw)
    return torch.stack([cos * xy[:, 0] - sin * xy[:, 1], sin * xy[:, 0] + cos * xy[:, 1]], 1)


def _length_along(obj, angle: float) -> float:
    """The extent (metres) of an object's mesh along the table direction `angle` (radians from x, at yaw 0)."""
    xy = np.asarray(obj.mesh.vertices, dtype=np.float64)[:, :2]
    along = xy @ np.array([math.cos(angle), math.sin(angle)])
    return float(along.max() - along.min())


def _centroid_axis(uv: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The weighted centroid (2,) of pixels `uv` (P, 2), their principal axis (2,) and the spread along it."""
    centre = (uv * weight[:, None]).sum(0) / weight.sum()
    cov = ((uv - centre) * weight[:, None]).T @ (uv - centre) / weight.sum()
    values, vectors = np.linalg.eigh(cov)
    return centre, vectors[:, 1], math.sqrt(max(float(values[1]), 0.0))


def _residual_regions(
    images: torch.Tensor, rendered: torch.Tensor, window: int, regions: int = 1, covered: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The connected regions of large residual (the signed residual box-averaged over `_preblur` pixels, then
    squared and summed over channels, outside `covered` (M, H, W) where given; pixels over a quarter of its peak
    averaged over `window`) that hold the most residual, up to `regions` per image, each by its residual-weighted
    centroid and long axis, and a long region (spread along its axis over half the window) also by the pieces of it
    within `window` of its two ends: the patches of image that the render does not explain (a missing object's
    silhouette).

    Returns:
        (R, 2) continuous pixels (u, v), (R, 2) unit principal axes (du, dv) and LongTensor (R,) the image (row
        of `images`) each region is in; every image has at least one (its centre when nothing is unexplained).
    """
    from scipy import ndimage

    k = _preblur(window)
    difference = F.avg_pool2d(images - rendered, k, stride=1, padding=k // 2, count_include_pad=False)
    r = (difference**2).sum(1, keepdim=True)  # (M, 1, H, W)
    if covered is not None:
        r = r * ~covered[:, None]
    smooth = F.avg_pool2d(r, window, stride=1, padding=window // 2, count_include_pad=False)[:, 0]
    centres, axes, owners = [], [], []
    for m, (s, raw) in enumerate(zip(smooth.cpu().numpy(), r[:, 0].cpu().numpy())):
        # the pixels whose own residual is large, against the level of the smoothed peak (so that thin edges of
        # a pose's misfit fall below it), in 8-connected regions (so that two objects apart stay apart)
        labels, n = ndimage.label(raw > 0.25 * s.max(), structure=np.ones((3, 3)))
        if n == 0:
            centres.append((s.shape[1] / 2, s.shape[0] / 2))
            axes.append((1.0, 0.0))
            owners.append(m)
            continue
        mass = ndimage.sum_labels(raw, labels, index=np.arange(1, n + 1))
        for label in 1 + np.argsort(-mass)[:regions]:
            v, u = np.nonzero(labels == label)
            weight = raw[v, u]
            uv = np.stack([u, v], 1).astype(np.float64) + 0.5
            centre, axis, spread = _centroid_axis(uv, weight)
            pieces = [(centre, axis)]
            if spread > window / 2:
                # a long region: also the pieces within a window of its two ends, each by its own centroid and axis
                # (two thin objects touching make one bent region whose centroid and axis fit neither)
                along = (uv - centre) @ axis
                for end in (uv[along.argmin()], uv[along.argmax()]):
                    near = np.linalg.norm(uv - end, axis=1) <= window
                    if near.sum() >= 3:
                        pieces.append(_centroid_axis(uv[near], weight[near])[:2])
            for c, a in pieces:
                centres.append(tuple(c.tolist()))
                axes.append(tuple(a.tolist()))
                owners.append(m)
    device = images.device
    as_float = [torch.tensor(a, dtype=torch.float32, device=device) for a in (centres, axes)]
    return as_float[0], as_float[1], torch.tensor(owners, dtype=torch.long, device=device)
