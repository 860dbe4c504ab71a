"""The supervised baseline for tabletop scenes: a CNN that regresses K slots of (presence, identity, position, yaw)
from labelled renders, trained with Hungarian matching between slots and true objects.

Why matching: a fixed slot order (say, objects sorted by x) makes the target jump when two objects swap order,
and a network cannot fit a discontinuous function of the image. Matching each image's true objects to the slots
that explain them best (DETR, Carion et al. 2020) lets every slot specialise freely. The matching cost of a
(slot, object) pair is exactly the loss that pairing adds (see `pair_costs`), so the assignment minimises the loss.

Yaw without a wrap-around, and with the symmetry of each shape. A shape that looks the same after a turn of
2 pi / m (m = 4 for the cube, 2 for the box, 1 for the wedge) is given the target (cos m yaw, sin m yaw), which is
the same for all m equivalent yaws: a function of the image, continuous, free of the wrap at +-pi. Plain
(cos yaw, sin yaw) gives a cube four targets for one image; a regressor then predicts their mean, near (0, 0), and
its yaw is noise. `symmetric_yaw=False` trains that plain encoding, as the naive baseline for the paper's claim
that a supervised network struggles with multimodal rotation. Each slot predicts one vector per shape and the loss
uses the true shape's; spheres and upright cylinders (any yaw) have no yaw loss and are reported with yaw 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from inverse_graphics.tabletop import world3d
from inverse_graphics.tabletop.appearance import AppearanceFit
from inverse_graphics.tabletop.modules3d import ConvEncoder, SlotHead, SlotOutput
from inverse_graphics.tabletop.refine import RefineConfig, refine
from inverse_graphics.tabletop.scene_search import SearchConfig
from scenes.world import SceneTensors, World

__all__ = [
    "MODEL_KIND",
    "SupervisedConfig",
    "LossWeights",
    "SceneInference",
    "check_images",
    "SupervisedRegressor",
    "yaw_orders",
    "default_fit_appearance",
    "pair_costs",
    "match_slots",
    "matched_loss",
]

MODEL_KIND = "supervised-tabletop"  # checkpoint "model" field


def yaw_orders(symmetric: bool, world: World | None = None) -> torch.Tensor:
    """LongTensor (S,): the m of each object's yaw code (cos m yaw, sin m yaw); 0 for objects with any-yaw symmetry.

    symmetric: m = 2 pi / the object's yaw period (cube 4, box 2, wedge 1); otherwise m = 1 for every object
    with a yaw. world: whose objects (None: the primitives world).
    """
    return world3d.yaw_orders(world or world3d.primitives(), symmetric)


@dataclass
class SupervisedConfig:
    """The regressor's architecture; saved in checkpoints."""

    image_size: int | tuple[int, int] | None = None  # the input renders: an int (H = W) or (W, H); None: the world's
    slots: int | None = None  # K, the most objects it can report; None: the world's objects_per_scene max
    channels: tuple[int, ...] = (32, 64, 128, 128)  # stride-2 convolutions, one per entry
    embed_dim: int = 256  # width of the image embedding
    symmetric_yaw: bool = True  # yaw code per shape symmetry (see module docstring); False: plain (cos, sin)
    world: dict | None = None  # the World (World.to_dict(), plain JSON); None: the built-in primitives world

    def __post_init__(self) -> None:
        world = self.world or {}
        size = self.image_size if self.image_size is not None else world.get("image_size", 64)
        if not isinstance(size, int):
            W, H = (int(v) for v in size)
            size = W if W == H else (W, H)
        self.image_size = size
        if self.slots is None:
            self.slots = int(world.get("objects_per_scene", (0, 3))[1])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SupervisedConfig:
        d = {**d, "channels": tuple(d["channels"])}
        if isinstance(d.get("image_size"), list):
            d["image_size"] = tuple(d["image_size"])
        return cls(**d)


@dataclass
class LossWeights:
    """Weights and scales of the matched loss (per matched object, summed over objects, averaged over images)."""

    position_scale: float = 0.01  # metres: Huber loss on position error in these units (1 cm ~ 1 pixel at 64)
    position: float = 1.0  # weight of the position term
    identity: float = 1.0  # weight of the shape cross-entropy
    yaw: float = 1.0  # weight of the squared error of the yaw vector


@dataclass(frozen=True)
class SceneInference:
    """What `infer` returns (the 3D counterpart of the 2D models' InferenceResult)."""

    scenes: list[dict]  # B scenes in the tabletop JSON format of DESIGN.md
    counts: torch.Tensor  # LongTensor (B,): objects in each scene
    presence: torch.Tensor  # FloatTensor (B, K): each slot's probability of holding an object
    extras: dict = field(default_factory=dict)  # e.g. the unrefined scenes when refinement ran


def scene_inference(
    t: SceneTensors,
    images: torch.Tensor,
    refine_steps: int,
    presence: torch.Tensor,
    refine_gradient: str = "fd",
    world: World | None = None,
    fit_appearance: bool | None = False,
    start_appearance: AppearanceFit | None = None,
    method: str | None = None,
    search: bool = False,
) -> SceneInference:
    """Decoded scene tensors -> SceneInference, after `refine_steps` iterations of render-and-compare refinement
    against images (B, 3, H, W) when positive: Levenberg-Marquardt on the hard render for `refine_gradient` "fd",
    Adam steps through the soft rasterizer for "soft" (RefineConfig; `method` "lm" or "adam" overrides it), in
    `world` (None: the primitives world) and, with `fit_appearance`, the per-image appearance fitted first
    (inverse_graphics.tabletop.appearance; extras["appearance"]), starting from `start_appearance` (e.g. the guide's):
    True or None: the gain in closed form, then on the refined poses the light direction by Gauss-Newton
    (appearance.fit_light, about 20 renders of each image) and each object's albedo, and the poses again; with
    `search`, then the structure search
    (tabletop.scene_search); the unrefined scenes are kept in `extras`."""
    if refine_steps < 0:
        raise ValueError(f"refine must be >= 0 steps (0: no refinement), got {refine_steps}")
    scenes = world3d.tensors_to_scenes(world or world3d.primitives(), t)
    extras: dict = {}
    if refine_steps > 0:
        extras["unrefined"] = scenes
        cfg = RefineConfig(method, refine_steps, gradient=refine_gradient, appearance=fit_appearance is not False,
                           search=SearchConfig() if search else None)  # fmt: skip
        with torch.enable_grad():
            scenes = refine(scenes, images, cfg, world, start_appearance)
        if cfg.appearance:
            extras["appearance"] = [s.pop("appearance", None) for s in scenes]
    counts = torch.tensor([len(s["objects"]) for s in scenes], dtype=torch.long, device=t.shape_ids.device)
    return SceneInference(scenes, counts, presence, extras)


def check_images(images, size: int | tuple[int, int]) -> torch.Tensor:
    """Validate an input batch: a float tensor (B, 3, H, W) in [0, 1] without NaN, size = H = W or (W, H);
    TypeError / ValueError naming the problem (both sizes for another image size)."""
    return world3d.check_images(images, (size, size) if isinstance(size, int) else size)


def default_fit_appearance(world: World | None) -> bool:
    """Whether `infer` fits the appearance by default: when the world randomises exposure, light, ambient or the
    camera's position."""
    r = None if world is None else world.randomize
    return r is not None and max(r.brightness, r.light_direction_degrees, r.ambient, r.camera_position) > 0


class SupervisedRegressor(nn.Module):
    """CNN regressor for one World (`self.world`, carried in the config): renders (B, 3, H, W) -> K slots
    (modules3d.SlotOutput) over the world's objects."""

    yaw_order: torch.Tensor  # LongTensor (S,), see yaw_orders

    def __init__(self, config: SupervisedConfig | None = None):
        super().__init__()
        config = self.config = config or SupervisedConfig()
        self.world: World = world3d.world_from_config(config.world)
        self.legacy = config.world is None
        assert config.image_size is not None and config.slots is not None  # set by __post_init__
        size = config.image_size
        self.image_wh = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if not self.legacy and config.slots < self.world.objects_per_scene[1]:
            raise ValueError(f"slots = {config.slots} cannot hold the {self.world.objects_per_scene[1]} objects a "
                             f"scene of world {self.world.name!r} may have; use slots >= that or None")  # fmt: skip
        self.encoder = ConvEncoder(size, config.channels, config.embed_dim)
        half = world3d.table_half_sizes(self.world)
        self.head = SlotHead(config.embed_dim, config.slots, len(self.world.objects), half)
        self.register_buffer("yaw_order", world3d.yaw_orders(self.world, config.symmetric_yaw), persistent=False)

    def forward(self, images: torch.Tensor) -> SlotOutput:
        """images FloatTensor (B, 3, H, W) in [0, 1] -> SlotOutput."""
        W, H = self.image_wh
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, H, W):
            raise ValueError(f"expected images (B, 3, {H}, {W}) in [0, 1], got {tuple(images.shape)}")
        return self.head(self.encoder(images))

    def decode(self, out: SlotOutput, threshold: float = 0.5) -> SceneTensors:
        """Slots -> padded scene tensors (B, K): present slots with their most probable shape, the position
        clamped so the footprint lies on the table, and the yaw decoded from that shape's vector."""
        present = torch.sigmoid(out.presence_logits) > threshold  # (B, K)
        shape_ids = out.shape_logits.argmax(-1)  # (B, K)
        index = shape_ids[..., None, None].expand(-1, -1, 1, 2)  # (B, K, 1, 2)
        c, s = out.yaw_vectors.gather(2, index).squeeze(2).unbind(-1)  # (B, K) each
        order = self.yaw_order[shape_ids]  # (B, K)
        yaws = torch.where(order > 0, torch.atan2(s, c) / order.clamp(min=1), torch.zeros_like(c))
        shape_ids = torch.where(present, shape_ids, torch.full_like(shape_ids, -1))
        return SceneTensors(shape_ids, world3d.clamp_to_table(self.world, shape_ids, out.positions, yaws), yaws)

    @torch.no_grad()
    def infer(
        self,
        images: torch.Tensor,
        refine: int | None = None,
        threshold: float = 0.5,
        refine_gradient: str = "fd",
        resize: bool = False,
        fit_appearance: bool | None = None,
        search: bool | None = None,
    ) -> SceneInference:
        """Scenes from renders (the same call as `AIR3D.infer`).

        Args:
            images: FloatTensor (B, 3, H, W) in [0, 1].
            refine: K iterations of render-and-compare refinement (tabletop.refine: Levenberg-Marquardt,
                about 2-4 are used); None or 0: none (the baseline is reported raw unless refinement is asked for).
            threshold: presence probability above which a slot reports an object.
            refine_gradient: "fd" (Levenberg-Marquardt on finite differences of the black-box render) or "soft"
                (K Adam steps through the soft rasterizer).
            resize: resize images of another size to the model's (bilinear, antialiased); False: a ValueError
                naming both sizes.
            fit_appearance: with refinement, fit each image's exposure gain (closed form) and light direction
                (Gauss-Newton, inverse_graphics.tabletop.appearance) first; None: when the model's world randomises
                its appearance, nothing otherwise; False: the nominal appearance.
            search: with refinement, then the structure search (tabletop.scene_search); None: off for the baseline
                (it is reported as regressed unless asked).
        Raises:
            TypeError / ValueError naming the problem for a non-tensor, non-float, wrong shape, NaN or [0, 1].
        """
        images = world3d.prepare_images(images, self.image_wh, resize).to(self.head.fc.weight)
        out = self(images)
        t = self.decode(out, threshold)
        presence = torch.sigmoid(out.presence_logits)
        world = None if self.legacy else self.world
        fit = (None if default_fit_appearance(world) else False) if fit_appearance is None else fit_appearance
        steps = int(refine or 0)
        search = bool(search) and steps > 0 and refine_gradient == "fd"
        return scene_inference(t, images, steps, presence, refine_gradient, world, fit, None, None, search)


def pair_costs(out: SlotOutput, labels: SceneTensors, yaw_order: torch.Tensor, w: LossWeights) -> torch.Tensor:
    """The loss each (slot, true object) pairing adds, relative to leaving the slot empty.

    Presence: BCE(logit, 1) - BCE(logit, 0) = -logit. Identity: cross-entropy. Position: Huber in units of
    `w.position_scale`. Yaw: squared error of the slot's vector for the true shape against (cos m yaw, sin m yaw).

    Args:
        out: SlotOutput with B images and K slots; labels: SceneTensors with N slots (-1 shape ids: no object).
        yaw_order: LongTensor (S,) from `yaw_orders`.
    Returns:
        FloatTensor (B, K, N), differentiable in `out`.
    """
    B, K, N = out.positions.shape[0], out.positions.shape[1], labels.shape_ids.shape[1]
    ids = labels.shape_ids.clamp(min=0)  # (B, N)
    identity = -F.log_softmax(out.shape_logits, -1).gather(2, ids[:, None, :].expand(B, K, N))  # (B, K, N)
    delta = (out.positions[:, :, None] - labels.positions[:, None]) / w.position_scale  # (B, K, N, 2)
    position = F.huber_loss(delta, torch.zeros_like(delta), reduction="none").sum(-1)  # (B, K, N)
    m = yaw_order[ids].to(labels.yaws)  # (B, N)
    target = torch.stack([torch.cos(m * labels.yaws), torch.sin(m * labels.yaws)], -1)  # (B, N, 2)
    vectors = out.yaw_vectors.gather(2, ids[:, None, :, None].expand(B, K, N, 2))  # (B, K, N, 2)
    yaw = ((vectors - target[:, None]) ** 2).sum(-1) * (m > 0)[:, None, :]  # (B, K, N)
    presence = -out.presence_logits[:, :, None]  # (B, K, 1)
    return presence + w.identity * identity + w.position * position + w.yaw * yaw


def match_slots(costs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Hungarian assignment of each image's true objects to distinct slots.

    Args:
        costs: FloatTensor (B, K, N) pair costs (only compared, never differentiated).
        valid: BoolTensor (B, N), True where the label slot holds an object.
    Returns:
        BoolTensor (B, K, N): True for the matched (slot, object) pairs; every valid object is matched once.
    """
    B, K, N = costs.shape
    most = int(valid.sum(1).max()) if B else 0
    if most > K:
        raise ValueError(f"a scene has {most} objects but the regressor has only {K} slots")
    matched = torch.zeros(B, K, N, dtype=torch.bool)
    cost = costs.detach().cpu().numpy()
    for b, cols in enumerate(valid.cpu().numpy()):
        objects = np.flatnonzero(cols)
        rows, picked = linear_sum_assignment(cost[b][:, objects])
        matched[b, rows, objects[picked]] = True
    return matched.to(costs.device)


def matched_loss(
    out: SlotOutput, labels: SceneTensors, yaw_order: torch.Tensor, w: LossWeights
) -> tuple[torch.Tensor, dict]:
    """Mean over images of: BCE(presence, 0) over all slots + the pair costs of the matched pairs.

    Returns the scalar loss and float statistics (per matched object: identity accuracy, position error in mm).
    """
    costs = pair_costs(out, labels, yaw_order, w)  # (B, K, N)
    matched = match_slots(costs, labels.shape_ids >= 0)  # (B, K, N)
    loss = (F.softplus(out.presence_logits).sum(1) + (costs * matched).sum((1, 2))).mean()
    stats: dict = {"loss": float(loss.detach())}
    with torch.no_grad():
        slot, obj = matched.any(2), matched.float().argmax(2)  # (B, K) matched slots and their objects
        if slot.any():
            true_ids = labels.shape_ids.gather(1, obj)[slot]
            true_xy = labels.positions.gather(1, obj[..., None].expand(-1, -1, 2))[slot]
            stats["identity_acc"] = float((out.shape_logits.argmax(-1)[slot] == true_ids).float().mean())
            stats["position_error_mm"] = 1000 * float((out.positions[slot] - true_xy).norm(dim=-1).mean())
    return loss, stats
