"""Batched mesh rendering through PyTorch3D: rigid objects posed on a static stage (camera, light, table).

Tensors in, images out; this module knows nothing about what a shape *means* (see `scenes/tabletop.py`).

Frames and units
- World frame = the table frame of `scenes/tabletop.py`: metres, z up, the table top is the plane z = 0.
- Object frame: metres, z up, origin at the centre of the object's footprint on the table. An object with pose
  (x, y, yaw) maps an object-frame point v to the world point `Rz(yaw) v + (x, y, 0)`; yaw is in radians,
  counter-clockwise seen from above (right-handed about +z).
- Camera: a pinhole at `Camera.eye` looking at `Camera.at`, `Camera.up` upwards in the image. Its intrinsics
  are (fx, fy, cx, cy) in pixels of the rendered W x H image (`Camera.pixel_intrinsics`): a point at depth z
  with coordinates (x, y) in the camera frame of computer vision (x towards the image's right, y towards its
  bottom, z along the optical axis) appears at the continuous pixel coordinate
      u = cx + fx x / z  (along a row, from the left edge),   v = cy + fy y / z  (down a column, from the top),
  where pixel (col, row) covers [col, col + 1) x [row, row + 1) and is sampled at its centre (col + 0.5,
  row + 0.5); so cx = W / 2, cy = H / 2 is the image centre. Image row 0 is the top of the picture, column 0
  its left. Given by `fov_degrees` instead: the vertical field of view, fx = fy = H / (2 tan(fov / 2)),
  principal point at the centre. Every renderer here follows this; internally PyTorch3D's view frame is
  (+X left, +Y up, +Z forward) = (-x, -y, z) and its NDC for non-square images has the shorter side span
  [-1, 1] (see `ndc_intrinsics`); OpenGL's clip space is built in `renderers.opengl.world_to_clip`.
- Appearance: the stage's light, table colour and camera eye are its nominal values; `Appearance` overrides
  any of them per scene for one call (randomised training images, an inferred light).

Letters: B scenes, N object slots per scene (empty slots have shape id -1), K shapes in the library,
V vertices, F faces, H x W the image (`MeshRenderSettings.image_size` = (W, H), or one int for H = W).

Modes
- "hard": one face per pixel, no blur. For data and figures. Autograd through it is wrong at silhouettes (a
  pixel's colour jumps from object to table as the object moves, and hard rasterization has no gradient for
  that jump); only shading inside objects is differentiated.
- "soft": SoftRasterizer-style blending (Liu et al. 2019) of PyTorch3D's rasterizer output, differentiable
  with respect to object poses at silhouettes too. `MeshRenderSettings` and `soft_blend` give the choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from pytorch3d.renderer import (
    DirectionalLights,
    FoVPerspectiveCameras,
    Materials,
    MeshRasterizer,
    PerspectiveCameras,
    RasterizationSettings,
    TexturesVertex,
    look_at_view_transform,
)
from pytorch3d.renderer.mesh.shading import phong_shading
from pytorch3d.structures import Meshes

__all__ = [
    "Camera",
    "Light",
    "Stage",
    "Appearance",
    "image_width_height",
    "ndc_intrinsics",
    "MeshLibrary",
    "MeshRenderSettings",
    "RenderOutput",
    "MeshRenderer3D",
    "yaw_matrices",
    "place_vertices",
    "vertex_normals",
    "soft_blend",
]


def image_width_height(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(W, H) of an image size: one int (square) or (W, H), width first. ValueError for anything else."""
    if isinstance(image_size, bool):
        raise ValueError(f"image_size must be an int or (width, height), got {image_size!r}")
    if isinstance(image_size, int):
        size: tuple = (image_size, image_size)
    elif isinstance(image_size, tuple | list) and len(image_size) == 2:
        size = tuple(image_size)
    else:
        raise ValueError(f"image_size must be an int or (width, height), got {image_size!r}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
        raise ValueError(f"image_size must be positive whole pixels, got {image_size!r}")
    return size[0], size[1]


class ImageSize:
    """What every renderer's frozen settings share: an `image_size` field, one int (H = W) or (W, H), width first,
    checked and kept as a tuple when not square, with `.width` and `.height`."""

    image_size: int | tuple[int, int]

    def _check_image_size(self) -> None:
        width, height = image_width_height(self.image_size)
        if not isinstance(self.image_size, int):
            object.__setattr__(self, "image_size", (width, height))  # a list (from a file) becomes a tuple

    @property
    def width(self) -> int:
        """W in pixels."""
        return image_width_height(self.image_size)[0]

    @property
    def height(self) -> int:
        """H in pixels."""
        return image_width_height(self.image_size)[1]


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in the world frame (metres); the conventions are in this module's docstring."""

    eye: tuple[float, float, float]  # camera centre
    at: tuple[float, float, float]  # point the optical axis passes through
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)  # world direction that appears upwards in the image
    fov_degrees: float = 40.0  # full vertical field of view; used only when `intrinsics` is None
    znear: float = 0.3  # near clipping depth; also bounds the soft mode's depth normalisation
    zfar: float = 2.5  # far clipping depth; keep tight: soft blending divides depth gaps by (zfar - znear)
    # (fx, fy, cx, cy) in pixels of the rendered image; None: from fov_degrees, principal point at the centre
    intrinsics: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.intrinsics is not None:
            values = tuple(float(v) for v in self.intrinsics)
            if len(values) != 4 or not all(math.isfinite(v) for v in values) or min(values[:2]) <= 0:
                raise ValueError(f"intrinsics must be (fx, fy, cx, cy) with fx, fy > 0, got {self.intrinsics!r}")
            object.__setattr__(self, "intrinsics", values)
        elif not 0 < self.fov_degrees < 180:
            raise ValueError(f"fov_degrees must be in (0, 180), got {self.fov_degrees!r}")
        if not 0 < self.znear < self.zfar:
            raise ValueError(f"need 0 < znear < zfar, got znear={self.znear!r}, zfar={self.zfar!r}")

    def pixel_intrinsics(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) in pixels for a width x height image: `intrinsics` as given, or from the vertical
        `fov_degrees`: fx = fy = height / (2 tan(fov / 2)), cx = width / 2, cy = height / 2."""
        if self.intrinsics is not None:
            return self.intrinsics  # type: ignore[return-value]  # normalised to 4 floats in __post_init__
        f = height / (2.0 * math.tan(math.radians(self.fov_degrees) / 2.0))
        return f, f, width / 2.0, height / 2.0


def ndc_intrinsics(camera: Camera, width: int, height: int) -> tuple[float, float, float, float]:
    """(fx, fy, px, py) of PyTorch3D's NDC `PerspectiveCameras` equal to the camera's pixel intrinsics.

    PyTorch3D's NDC has +X left, +Y up, and the shorter image side spanning [-1, 1] (`s = min(W, H)` pixels);
    the continuous pixel coordinate u (from the left) is x_ndc = (W - 2 u) / s, v (from the top) is
    y_ndc = (H - 2 v) / s. With the view frame (X, Y, Z) = (-x, -y, z), u = cx + fx x / z gives
    x_ndc = (2 fx / s) X / Z + (W - 2 cx) / s, and likewise for y.
    """
    fx, fy, cx, cy = camera.pixel_intrinsics(width, height)
    s = min(width, height)
    return 2 * fx / s, 2 * fy / s, (width - 2 * cx) / s, (height - 2 * cy) / s


@dataclass(frozen=True)
class Light:
    """One directional light plus ambient light on Lambertian surfaces (no specular, so backends agree)."""

    direction: tuple[float, float, float]  # world direction from a surface *towards* the light
    ambient: float = 0.35  # ambient intensity (all channels)
    diffuse: float = 0.65  # directional intensity; colour = albedo * (ambient + diffuse * max(0, n . l))


@dataclass(frozen=True)
class Stage:
    """Everything that does not move: camera, light, the table mesh and the colours."""

    camera: Camera
    light: Light
    table_verts: torch.Tensor  # FloatTensor (Vt, 3) world-frame vertices of the table
    table_faces: torch.Tensor  # LongTensor (Ft, 3) triangles, counter-clockwise seen from above
    table_color: tuple[float, float, float] = (0.45, 0.45, 0.45)  # table albedo, RGB in [0, 1]
    object_color: tuple[float, float, float] = (0.95, 0.95, 0.95)  # default object albedo, RGB in [0, 1]
    background_color: tuple[float, float, float] = (0.0, 0.0, 0.0)  # where no surface is seen


@dataclass(frozen=True)
class Appearance:
    """Per-scene overrides of the stage for one render call; each field None = the stage's nominal value.

    Every tabletop renderer takes it as `renderer(shape_ids, positions, yaws, colors, appearance)`. The PyTorch3D
    renderer is differentiable in light_direction, ambient, diffuse and table_color (tested against central
    differences, tests/test_appearance.py); autograd also flows into `eye`, but that gradient is incomplete (the
    table's outline is hard-rendered in both modes, and object silhouettes in hard mode, so their motion is
    missed): do not fit the eye by gradient. The OpenGL renderer carries no gradient. Exposure gain and pixel
    noise are not here: the caller applies them to the images.
    """

    light_direction: torch.Tensor | None = None  # FloatTensor (B, 3) world direction towards the light (any length)
    ambient: torch.Tensor | None = None  # FloatTensor (B,) ambient intensity
    diffuse: torch.Tensor | None = None  # FloatTensor (B,) directional intensity
    table_color: torch.Tensor | None = None  # FloatTensor (B, 3) table albedo, RGB
    eye: torch.Tensor | None = None  # FloatTensor (B, 3) camera centre; it still looks at Camera.at with Camera.up

    _WIDTHS = {"light_direction": 3, "ambient": None, "diffuse": None, "table_color": 3, "eye": 3}

    @classmethod
    def nominal(cls, stage: Stage, batch: int, device: torch.device | str = "cpu") -> Appearance:
        """Every field filled with the stage's nominal value for `batch` scenes (a start to edit from)."""

        def rows(values) -> torch.Tensor:
            value = torch.tensor(values, dtype=torch.float32, device=device)
            return value.expand(batch, *value.shape).clone()

        light = stage.light
        return cls(
            light_direction=rows(light.direction),
            ambient=rows(light.ambient),
            diffuse=rows(light.diffuse),
            table_color=rows(stage.table_color),
            eye=rows(stage.camera.eye),
        )

    def is_nominal(self) -> bool:
        """True when no field is set (the stage is used as it is)."""
        return all(getattr(self, f.name) is None for f in fields(self))

    def validate(self, batch: int) -> None:
        """ValueError naming the field unless each set field is a floating tensor of its shape for `batch`."""
        for name, width in self._WIDTHS.items():
            value = getattr(self, name)
            if value is None:
                continue
            shape = (batch,) if width is None else (batch, width)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or not value.is_floating_point():
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"Appearance.{name} must be a float tensor of shape {shape}, got {got}")

    def take(self, rows: torch.Tensor) -> Appearance:
        """The appearance of scenes `rows` (LongTensor (M,)), e.g. for perturbed copies of each scene."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        return Appearance(**{k: None if v is None else v[rows.to(v.device)] for k, v in picked.items()})

    def scene_stage(self, stage: Stage, b: int) -> Stage:
        """The stage as scene b sees it (a slow reference for batched appearance)."""

        def pick(name: str, nominal):
            value = getattr(self, name)
            if value is None:
                return nominal
            item = value[b].detach().cpu().double()
            return float(item) if item.ndim == 0 else tuple(float(v) for v in item)

        light = Light(pick("light_direction", stage.light.direction), pick("ambient", stage.light.ambient),
                      pick("diffuse", stage.light.diffuse))  # fmt: skip
        camera = replace(stage.camera, eye=pick("eye", stage.camera.eye))
        return replace(stage, camera=camera, light=light, table_color=pick("table_color", stage.table_color))


@dataclass(frozen=True)
class MeshLibrary:
    """The K shapes objects are instances of, as tensors in the object frame."""

    verts: tuple[torch.Tensor, ...]  # K FloatTensors (V_k, 3): object-frame vertices, metres
    faces: tuple[torch.Tensor, ...]  # K LongTensors (F_k, 3): triangles, counter-clockwise seen from outside
    # K flags: the mesh tessellates a solid of revolution about z, so its yaw is ignored when posed; otherwise
    # its facets give a spurious yaw gradient (measured: 0.2 of the position gradient, 24-sided cylinder)
    yaw_invariant: tuple[bool, ...] = ()

    def pose_yaw(self, k: int, yaw: torch.Tensor) -> torch.Tensor:
        """The yaw that shape k is drawn with: `yaw`, or 0 (gradient exactly 0) for yaw-invariant shapes."""
        return yaw * 0 if k < len(self.yaw_invariant) and self.yaw_invariant[k] else yaw

    def __len__(self) -> int:
        return len(self.verts)


@dataclass(frozen=True)
class MeshRenderSettings(ImageSize):
    """How to rasterize. The soft-mode choices were measured on 12 random tabletop scenes at 64 px, comparing
    the autograd gradient of an image loss with central differences of the hard render at about one pixel of
    motion (the check is benchmarks/bench_gradients.py; run 2026-11-26 on the 2-core CPU):

    - `sigma = 1e-4` (squared NDC distance; about 0.1 pixel^2 at 64 px) and `gamma = 1e-1`: cosine 0.97 for
      positions and 0.87 for yaws, mean absolute image difference to the hard render 0.0025 (on 64 other
      scenes: 0.95 and 0.84, sign agreement 0.97 and 0.80; benchmarks/results/bench_gradients.md). A sharper
      sigma (3e-5) lowers the yaw cosine to 0.67; gamma <= 1e-3 makes nearer faces bleed over farther ones
      (position cosine 0.3-0.9). Hard rasterization's own autograd: position cosine 0.39, yaw -0.22 (it has
      no silhouette term). sigma is rescaled by (64 / image_size)^2 so the blur is the same in pixels.
    - The table is not in the soft z-buffer but composited behind the objects (see `soft_blend`), and back
      faces are culled: with the table as a mesh, gamma = 0.1 blends it into every object pixel.
    - `faces_per_pixel = 20` keeps every face within the blur radius of a pixel (a sphere has 320 faces).
    - `perspective_correct = False`: with blur, PyTorch3D's perspective-corrected barycentrics of faces
      *near* (not covering) a pixel divide by small numbers and give spurious huge gradients (a known open
      PyTorch3D issue; measured on three sets of 12 scenes: position-gradient norm 1.0x, 1.6x and 100x the
      screen-space one). Screen-space barycentrics are smooth and at these sizes indistinguishable in the
      image. Hard mode uses the same setting.
    """

    image_size: int | tuple[int, int] = 64  # pixels: one int for H = W, or (W, H), width first
    mode: str = "hard"  # "hard" (data, figures) or "soft" (differentiable at silhouettes)
    sigma: float = 1e-4  # soft mode: edge sharpness at 64 px, squared NDC distance (scaled with image size)
    gamma: float = 1e-1  # soft mode: depth-blending temperature on depth normalised to [0, 1]
    faces_per_pixel: int = 20  # soft mode: faces blended per pixel (hard mode always uses 1)
    perspective_correct: bool = False  # barycentrics in screen space (see above); both modes, so they agree
    bin_size: int = 0  # 0 = naive rasterization: exact, no bin overflow, fast enough at these image sizes

    def __post_init__(self) -> None:
        if self.mode not in ("hard", "soft"):
            raise ValueError(f"mode must be 'hard' or 'soft', got {self.mode!r}")
        self._check_image_size()

    @property
    def scaled_sigma(self) -> float:
        """`sigma` rescaled from 64 px to the image's shorter side (PyTorch3D's NDC spans [-1, 1] along it), so
        the blur covers the same number of pixels."""
        return self.sigma * (64.0 / min(self.width, self.height)) ** 2


@dataclass(frozen=True)
class RenderOutput:
    """What every renderer returns (PyTorch3D-like frozen output)."""

    images: torch.Tensor  # FloatTensor (B, 3, H, W) RGB in [0, 1]
    object_mask: torch.Tensor  # BoolTensor (B, H, W): the nearest surface at the pixel centre is an object
    extras: dict = field(default_factory=dict)  # backend-specific tensors (e.g. PyTorch3D fragments)


def yaw_matrices(yaws: torch.Tensor) -> torch.Tensor:
    """Rotations about +z.

    Args:
        yaws: FloatTensor (...,) of angles in radians, counter-clockwise seen from above.
    Returns:
        FloatTensor (..., 3, 3) R with world = R @ object.
    """
    c, s = torch.cos(yaws), torch.sin(yaws)
    zero, one = torch.zeros_like(yaws), torch.ones_like(yaws)
    rows = [c, -s, zero, s, c, zero, zero, zero, one]
    return torch.stack(rows, dim=-1).reshape(*yaws.shape, 3, 3)


def place_vertices(verts: torch.Tensor, position: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Pose one object: world = Rz(yaw) v + (x, y, 0).

    Args:
        verts: FloatTensor (V, 3) object-frame vertices.
        position: FloatTensor (2,) table-frame (x, y) in metres.
        yaw: FloatTensor () radians.
    Returns:
        FloatTensor (V, 3) world-frame vertices, differentiable in position and yaw.
    """
    offset = torch.cat([position, position.new_zeros(1)])  # (3,)
    return verts @ yaw_matrices(yaw).T + offset


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals by `pytorch3d.structures.Meshes`'s formula (for other backends).

    Args:
        verts: FloatTensor (V, 3); faces: LongTensor (F, 3).
    Returns:
        FloatTensor (V, 3) unit normals.
    """
    v0, v1, v2 = verts[faces].unbind(1)  # each (F, 3)
    face_normals = torch.cross(v2 - v1, v0 - v1, dim=1)  # (F, 3), length = twice the area
    normals = torch.zeros_like(verts)
    for corner in range(3):
        normals = normals.index_add(0, faces[:, corner], face_normals)
    return torch.nn.functional.normalize(normals, eps=1e-6, dim=1)


def pytorch3d_cameras(
    camera: Camera,
    batch: int,
    device: torch.device,
    image_size: int | tuple[int, int] | None = None,
    eye: torch.Tensor | None = None,
) -> FoVPerspectiveCameras | PerspectiveCameras:
    """PyTorch3D cameras (one per scene) for a `Camera` rendering `image_size` (None: square).

    A `fov_degrees` camera on a square image is PyTorch3D's `FoVPerspectiveCameras` (the images of every
    earlier release); otherwise an NDC `PerspectiveCameras` from `ndc_intrinsics` (tested equal where both
    apply). eye: optional FloatTensor (B, 3) per-scene camera centres (differentiable), else `camera.eye`.
    """
    width, height = (1, 1) if image_size is None else image_width_height(image_size)
    if eye is None:
        R, T = look_at_view_transform(eye=(camera.eye,), at=(camera.at,), up=(camera.up,), device=device)
        R, T = R.expand(batch, 3, 3), T.expand(batch, 3)
    else:
        at = torch.tensor((camera.at,), dtype=eye.dtype, device=device).expand(batch, 3)
        up = torch.tensor((camera.up,), dtype=eye.dtype, device=device).expand(batch, 3)
        R, T = look_at_view_transform(eye=eye.to(device), at=at, up=up, device=device)
    if camera.intrinsics is None and width == height:
        return FoVPerspectiveCameras(
            R=R, T=T, fov=camera.fov_degrees, znear=camera.znear, zfar=camera.zfar, device=device
        )
    fx, fy, px, py = ndc_intrinsics(camera, width, height)
    return PerspectiveCameras(
        focal_length=((fx, fy),), principal_point=((px, py),), R=R, T=T, in_ndc=True, device=device
    )


def soft_blend(
    colors: torch.Tensor,
    fragments,
    background: torch.Tensor,
    settings: MeshRenderSettings,
    camera: Camera,
) -> torch.Tensor:
    """Soft aggregation of the objects' faces, alpha-composited over a background image (the table).

    Colour: SoftRasterizer's depth-weighted softmax over the K faces near a pixel (Liu et al. 2019, eq. 6;
    PyTorch3D's `softmax_rgb_blend`) without its background term. Coverage: alpha = min(1, sum_k prob_k), the
    faces' sigmoid coverages *added*. Deviation from SoftRas, whose alpha = 1 - prod_k (1 - prob_k): two
    faces sharing an internal edge each have prob 0.5 on it, so the product gives 0.75 and the table shows
    through every triangle edge; added, sigmoid(d / sigma) + sigmoid(-d / sigma) = 1 exactly, while at a
    silhouette only one face is near and alpha = its coverage, which is where the pose gradient comes from.

    The table may stay out of the soft z-buffer because objects rest on it and the camera looks down: it never
    occludes an object. With the table as a mesh, gamma = 0.1 blends it into every object pixel (it lies only
    ~0.1 of the normalised depth range behind), and a gamma small enough to stop that lets nearer faces bleed
    over farther ones, which ruins the gradients (see MeshRenderSettings).

    Args:
        colors: FloatTensor (B, H, W, K, 3) shaded colour of each of the K nearest faces at each pixel.
        fragments: PyTorch3D Fragments: pix_to_face, zbuf, dists each (B, H, W, K).
        background: FloatTensor (1 or B, H, W, 3) the image seen where no face is.
        settings: sigma and gamma; camera: znear and zfar normalise depth.
    Returns:
        FloatTensor (B, H, W, 3).
    """
    mask = fragments.pix_to_face >= 0  # (B, H, W, K)
    prob = torch.sigmoid(-fragments.dists / settings.scaled_sigma) * mask  # coverage of each face
    z_inv = (camera.zfar - fragments.zbuf) / (camera.zfar - camera.znear) * mask  # 1 near, 0 far
    z_inv_max = z_inv.amax(-1, keepdim=True)  # (B, H, W, 1), for a stable exponent
    weights = prob * torch.exp((z_inv - z_inv_max) / settings.gamma)  # (B, H, W, K)
    foreground = (weights[..., None] * colors).sum(-2) / weights.sum(-1, keepdim=True).clamp(min=1e-10)
    alpha = prob.sum(-1, keepdim=True).clamp(max=1.0)  # (B, H, W, 1)
    return alpha * foreground + (1 - alpha) * background


class MeshRenderer3D(torch.nn.Module):
    """Renders B scenes of posed library objects on the stage, in hard or soft mode.

    Call shape shared by every tabletop renderer (this one, `renderers.opengl.OpenGLRenderer`,
    `renderers.finite_difference.FiniteDifferenceRenderer`):
        renderer(shape_ids, positions, yaws, colors=None, appearance=None) -> RenderOutput
    """

    def __init__(self, library: MeshLibrary, stage: Stage, settings: MeshRenderSettings | None = None):
        super().__init__()
        self.library = library
        self.stage = stage
        self.settings = settings or MeshRenderSettings()
        self._table_cache: dict = {}

    def forward(
        self,
        shape_ids: torch.Tensor,
        positions: torch.Tensor,
        yaws: torch.Tensor,
        colors: torch.Tensor | None = None,
        appearance: Appearance | None = None,
    ) -> RenderOutput:
        """Render a batch of scenes.

        Args:
            shape_ids: LongTensor (B, N): index into the library, -1 for an empty slot.
            positions: FloatTensor (B, N, 2): (x, y) on the table in metres.
            yaws: FloatTensor (B, N): yaw in radians.
            colors: optional FloatTensor (B, N, 3) per-object albedo; default `stage.object_color`.
            appearance: optional per-scene light, table colour and eye (`Appearance`); default the stage's.
        Returns:
            RenderOutput with images (B, 3, H, W) differentiable in positions and yaws (at silhouettes in soft
            mode only) and in the appearance tensors, and object_mask (B, H, W).
        """
        B = shape_ids.shape[0]
        if appearance is not None:
            appearance.validate(B)
            appearance = None if appearance.is_nominal() else appearance
        if B == 0:  # PyTorch3D cannot take an empty batch of meshes
            images = positions.new_zeros(0, 3, self.settings.height, self.settings.width)
            return RenderOutput(images=images, object_mask=images[:, 0].bool())
        soft = self.settings.mode == "soft"
        if soft and not (shape_ids >= 0).any():  # nothing but the table, which PyTorch3D cannot take as empty
            return self._empty_table(B, positions, appearance)
        meshes, is_object_face = self._build_meshes(shape_ids, positions, yaws, colors, not soft, appearance)
        rasterizer, shade = self._pipeline(B, positions.device, appearance)
        fragments = rasterizer(meshes)
        face_colors = shade(fragments, meshes)  # (B, H, W, K, 3)
        if soft:
            table = self._table_image(positions.device, positions.dtype, appearance)  # (1 or B, 3, H, W)
            table = table.permute(0, 2, 3, 1)  # (1 or B, H, W, 3)
            images = soft_blend(face_colors, fragments, table, self.settings, self.stage.camera)
        else:
            background = face_colors.new_tensor(self.stage.background_color)
            images = torch.where(fragments.pix_to_face[..., :1] >= 0, face_colors[..., 0, :], background)
        # (B, H, W, K): the pixel centre lies inside the face
        covered = (fragments.pix_to_face >= 0) & (fragments.dists <= 0)
        object_mask = (covered & is_object_face[fragments.pix_to_face.clamp(min=0)]).any(-1)  # (B, H, W)
        images = images.permute(0, 3, 1, 2).clamp(0.0, 1.0)  # (B, 3, H, W)
        return RenderOutput(images=images, object_mask=object_mask, extras={"fragments": fragments})

    def _empty_table(self, batch: int, positions: torch.Tensor, appearance: Appearance | None) -> RenderOutput:
        """B images of the bare table (soft mode with no object in the whole batch)."""
        W, H = self.settings.width, self.settings.height
        table = self._table_image(positions.device, positions.dtype, appearance).expand(batch, 3, H, W)
        no_objects = torch.zeros(batch, H, W, dtype=torch.bool, device=positions.device)
        return RenderOutput(images=table, object_mask=no_objects)

    def _table_image(self, device: torch.device, dtype: torch.dtype, appearance: Appearance | None) -> torch.Tensor:
        """FloatTensor (1, 3, H, W): the hard render of the empty table (cached; it never changes), or
        (B, 3, H, W) under a per-scene appearance (rendered each call, differentiable in it)."""
        hard = MeshRenderer3D(self.library, self.stage, replace(self.settings, mode="hard"))
        if appearance is not None:
            B = next(v.shape[0] for v in vars(appearance).values() if v is not None)
            empty = torch.full((B, 0), -1, dtype=torch.long, device=device)
            no_poses = torch.zeros(B, 0, 2, device=device, dtype=dtype)
            return hard(empty, no_poses, no_poses[..., 0], None, appearance).images
        key = (str(device), dtype, self.settings.image_size)
        if self._table_cache.get("key") != key:
            empty = torch.full((1, 0), -1, dtype=torch.long, device=device)
            no_poses = torch.zeros(1, 0, 2, device=device, dtype=dtype)
            out = hard(empty, no_poses, no_poses[..., 0])
            self._table_cache = {"key": key, "image": out.images}
        return self._table_cache["image"]

    def _pipeline(
        self, batch: int, device: torch.device, appearance: Appearance | None = None
    ) -> tuple[MeshRasterizer, Callable]:
        """The PyTorch3D rasterizer and a function (fragments, meshes) -> per-face colours (B, H, W, K, 3)."""
        s, light = self.settings, self.stage.light
        look = appearance or Appearance()
        cameras = pytorch3d_cameras(self.stage.camera, batch, device, s.image_size, look.eye)

        def per_scene(value: torch.Tensor | None, nominal) -> torch.Tensor | tuple:
            if value is None:
                return (nominal,)
            return value.to(device) if value.ndim == 2 else value.to(device)[:, None].expand(batch, 3)

        lights = DirectionalLights(
            direction=per_scene(look.light_direction, light.direction),
            ambient_color=per_scene(look.ambient, (light.ambient,) * 3),
            diffuse_color=per_scene(look.diffuse, (light.diffuse,) * 3),
            specular_color=((0.0, 0.0, 0.0),),
            device=device,
        )
        materials = Materials(specular_color=((0.0, 0.0, 0.0),), device=device)
        soft = s.mode == "soft"
        raster = RasterizationSettings(
            image_size=(s.height, s.width) if isinstance(s.image_size, tuple) else s.image_size,
            blur_radius=math.log(1.0 / 1e-4 - 1.0) * s.scaled_sigma if soft else 0.0,
            faces_per_pixel=s.faces_per_pixel if soft else 1,
            perspective_correct=s.perspective_correct,
            bin_size=s.bin_size,
            cull_backfaces=soft,  # closed meshes: hidden back faces must not blend in through the blur
        )

        def shade(fragments, meshes: Meshes) -> torch.Tensor:
            texels = meshes.sample_textures(fragments)
            return phong_shading(meshes, fragments, lights, cameras, materials, texels)

        return MeshRasterizer(cameras=cameras, raster_settings=raster), shade

    def _build_meshes(
        self,
        shape_ids: torch.Tensor,
        positions: torch.Tensor,
        yaws: torch.Tensor,
        colors: torch.Tensor | None,
        with_table: bool,
        appearance: Appearance | None = None,
    ) -> tuple[Meshes, torch.Tensor]:
        """One PyTorch3D mesh per scene: the table (if `with_table`) followed by its posed objects.

        Returns the Meshes and a BoolTensor (F_total,) marking packed faces that belong to objects.
        """
        device, dtype = positions.device, positions.dtype
        stage = self.stage
        table_v = stage.table_verts.to(device, dtype)[: None if with_table else 0]
        table_f = stage.table_faces.to(device)[: None if with_table else 0]
        table_rgb = None if appearance is None else appearance.table_color
        table_c = table_v.new_tensor(stage.table_color).expand_as(table_v)
        default_c = table_v.new_tensor(stage.object_color)
        verts, faces, vcolors, face_flags = [], [], [], []
        for b in range(shape_ids.shape[0]):
            if table_rgb is not None:
                table_c = table_rgb[b].to(device, dtype).expand_as(table_v)
            v_parts, f_parts, c_parts = [table_v], [table_f], [table_c]
            flags = [torch.zeros_like(table_f[:, 0])]
            offset = table_v.shape[0]
            for i in torch.nonzero(shape_ids[b] >= 0).flatten().tolist():
                k = int(shape_ids[b, i])
                yaw = self.library.pose_yaw(k, yaws[b, i])
                obj_v = place_vertices(self.library.verts[k].to(device, dtype), positions[b, i], yaw)
                obj_f = self.library.faces[k].to(device)
                albedo = default_c if colors is None else colors[b, i]
                v_parts.append(obj_v)
                f_parts.append(obj_f + offset)
                c_parts.append(albedo.expand_as(obj_v))
                flags.append(torch.ones_like(obj_f[:, 0]))
                offset += obj_v.shape[0]
            verts.append(torch.cat(v_parts))
            faces.append(torch.cat(f_parts))
            vcolors.append(torch.cat(c_parts))
            face_flags.append(torch.cat(flags))
        meshes = Meshes(verts=verts, faces=faces, textures=TexturesVertex(verts_features=vcolors))
        return meshes, torch.cat(face_flags).bool()
