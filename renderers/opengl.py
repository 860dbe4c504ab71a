"""A fast forward-only OpenGL renderer (moderngl, headless EGL) for the black-box finite-difference path.

It draws the same stage and objects as `renderers.mesh.MeshRenderer3D` in hard mode and matches its images
(tolerance stated and tested in tests/test_opengl.py): the same camera (the pinhole conventions of
`renderers.mesh`, as an OpenGL clip-space matrix: `world_to_clip`), the same per-scene `Appearance`, the same
Lambertian lighting with normals normalised per pixel, the same vertex normals (`renderers.mesh.vertex_normals`),
and screen-space (`noperspective`) interpolation like PyTorch3D's `perspective_correct=False`. Pixels are
sampled at their centres, without anti-aliasing, as PyTorch3D does. Measured: on 64 random scenes at 64 px,
1 pixel in 262,144 differs by more than 0.05 (an edge tie).

A batch is drawn as tiles of one framebuffer (one viewport per scene) and read back once. A scene's image depends
on its tile only in the last bits (a tile's offset rounds its vertices' window coordinates differently: up to 3e-5
on a few hundred of a kitchen scene's 36,864 values, measured against the same scene drawn alone), so the same
batch gives the same images every time, but a scene inferred in another batch may come out slightly otherwise
where a pose or a structure move of `infer` is a close call.

Needs the optional `gl` extra (`pip install 'inverse-graphics[gl]'`, i.e. moderngl) and an EGL driver: a GPU
driver, or Mesa's software rasteriser (Debian/Ubuntu packages libegl1 libegl-mesa0 libgl1-mesa-dri). Without
them `OpenGLRenderer` raises `OpenGLUnavailableError`, and callers fall back to the PyTorch3D renderer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
import torch

from renderers.mesh import (
    Appearance,
    Camera,
    ImageSize,
    MeshLibrary,
    RenderOutput,
    Stage,
    image_width_height,
    pytorch3d_cameras,
    vertex_normals,
)

__all__ = ["OpenGLUnavailableError", "OpenGLSettings", "OpenGLRenderer", "opengl_available", "world_to_clip"]

# One instanced draw per mesh per call: every instance carries its scene's pose, albedo, light, camera and the
# offset of its tile in the framebuffer (clip-space scale and shift; the tile's own clip volume is kept by four
# clip distances, as a viewport per tile kept it before), so a call costs a draw per shape, not per object. The
# camera matrix can also frame a pixel window of the image instead of all of it (`forward(..., windows=...)`):
# the tile is then the window's size and only that part is shaded.
_VERTEX_SHADER = """
#version 330
uniform vec2 tile_scale;  // a tile's size / the framebuffer's, per axis
in vec3 in_position;
in vec3 in_normal;
in vec4 pose;  // per instance: (cos yaw, sin yaw, x, y)
in vec3 albedo;
in float is_object;
in vec4 light;  // unit direction towards the light, ambient
in float diffuse;
in vec2 tile_offset;  // the tile's centre in the framebuffer's normalised device coordinates
in mat4 world_to_clip;  // the scene's camera
// The normal is interpolated linearly in screen space (PyTorch3D's perspective_correct=False), written as a
// perspective-correct varying of normal * w: its interpolant is that screen-linear one times a positive scalar,
// which the fragment shader's normalize removes. Why not `noperspective`: Mesa's clipper (llvmpipe, 22.3)
// interpolates noperspective varyings wrongly on triangles cut by clip distances (measured: whole runs of pixels
// shaded with a zero normal inside a window).
out vec3 normal_w;
flat out vec3 v_albedo;
flat out vec4 v_light;  // direction, ambient
flat out float v_diffuse;
flat out float v_is_object;
void main() {
    vec2 xy = vec2(pose.x * in_position.x - pose.y * in_position.y,
                   pose.y * in_position.x + pose.x * in_position.y) + pose.zw;
    vec3 normal = vec3(pose.x * in_normal.x - pose.y * in_normal.y,
                       pose.y * in_normal.x + pose.x * in_normal.y, in_normal.z);
    vec4 clip = world_to_clip * vec4(xy, in_position.z, 1.0);
    normal_w = normal * clip.w;
    gl_ClipDistance[0] = clip.w - clip.x;
    gl_ClipDistance[1] = clip.w + clip.x;
    gl_ClipDistance[2] = clip.w - clip.y;
    gl_ClipDistance[3] = clip.w + clip.y;
    gl_Position = vec4(clip.xy * tile_scale + clip.w * tile_offset, clip.zw);
    v_albedo = albedo;
    v_light = light;
    v_diffuse = diffuse;
    v_is_object = is_object;
}
"""
_FRAGMENT_SHADER = """
#version 330
in vec3 normal_w;
flat in vec3 v_albedo;
flat in vec4 v_light;
flat in float v_diffuse;
flat in float v_is_object;
out vec4 color;
void main() {
    float lambert = max(dot(normalize(normal_w), v_light.xyz), 0.0);
    color = vec4(v_albedo * (v_light.w + v_diffuse * lambert), v_is_object);
}
"""
_INSTANCE_FORMAT = "4f 3f 1f 4f 1f 2f 16f/i"  # one row of the instance data (`_render_tiles`)
_INSTANCE_ATTRIBUTES = ("pose", "albedo", "is_object", "light", "diffuse", "tile_offset", "world_to_clip")
_INSTANCE_FLOATS = 31
_GL_CLIP_DISTANCE0 = 0x3000


class OpenGLUnavailableError(RuntimeError):
    """No moderngl or no EGL context here; use the PyTorch3D renderer instead."""


@dataclass(frozen=True)
class OpenGLSettings(ImageSize):
    """How to draw with OpenGL."""

    image_size: int | tuple[int, int] = 64  # pixels: one int for H = W, or (W, H), width first
    max_tiles: int = 1024  # scenes drawn into one framebuffer before a read-back
    egl_device: int | None = None  # EGL device index (None: the default); pick a GPU on multi-GPU machines

    def __post_init__(self) -> None:
        self._check_image_size()


@cache
def _context(egl_device: int | None):
    """One shared headless context per EGL device."""
    try:
        import moderngl
    except ImportError as err:
        raise OpenGLUnavailableError(
            "the OpenGL renderer needs moderngl: pip install 'inverse-graphics[gl]'; "
            "or use the PyTorch3D renderer (backend='pytorch3d')"
        ) from err
    settings: dict[str, Any] = {"backend": "egl"}
    if egl_device is not None:
        settings["device_index"] = egl_device
    try:
        return moderngl.create_standalone_context(**settings)
    except Exception as err:  # moderngl/glcontext raise plain Exceptions naming the missing library
        raise OpenGLUnavailableError(
            f"no headless EGL context ({err}); install an EGL driver (GPU driver, or Mesa: apt-get install "
            "libegl1 libegl-mesa0 libgl1-mesa-dri) or use the PyTorch3D renderer (backend='pytorch3d')"
        ) from err


def opengl_available() -> str | None:
    """None if an EGL context can be made here, else the reason it cannot."""
    try:
        _context(None)
    except OpenGLUnavailableError as err:
        return str(err)
    return None


def world_to_clip(
    camera: Camera, image_size: int | tuple[int, int] | None = None, eye: tuple[float, float, float] | None = None
) -> np.ndarray:
    """(4, 4) float32 column-vector matrix from world points (x, y, z, 1) to OpenGL clip space.

    OpenGL's NDC = clip[:2] / clip[3] spans the whole image, x from -1 (left edge) to 1 (right edge) and y from
    -1 (bottom) to 1 (top): the continuous pixel coordinate (u, v) of `renderers.mesh` (from the top left) is
    x = 2 u / W - 1, y = 1 - 2 v / H. So u = cx + fx x_cv / z with the view frame of PyTorch3D, X = -x_cv,
    gives clip_x = -(2 fx / W) X + (2 cx / W - 1) Z, and v = cy - fy Y / Z gives
    clip_y = (2 fy / H) Y + (1 - 2 cy / H) Z; clip_w = Z, the depth. Depth maps znear..zfar to -1..1.

    Args:
        camera: the camera (fov or intrinsics).
        image_size: int (square) or (W, H); needed for intrinsics, None = square for a fov camera.
        eye: camera centre to use instead of `camera.eye` (a per-scene `Appearance.eye`).
    """
    if image_size is None and camera.intrinsics is not None:
        raise ValueError("world_to_clip needs the image size (W, H) for a camera given by intrinsics")
    return world_to_clips(camera, image_size, np.asarray([camera.eye if eye is None else eye]))[0]


def world_to_clips(camera: Camera, image_size: int | tuple[int, int] | None, eyes: np.ndarray) -> np.ndarray:
    """(B, 4, 4) float32: `world_to_clip` of `camera` moved to each of `eyes` (B, 3), in one batch (a per-scene
    camera is a matrix per scene and render: one at a time they cost most of a small OpenGL render)."""
    return (_projection(camera, image_size) @ _look_ats(camera, eyes)).astype(np.float32)


def _projection(camera: Camera, image_size: int | tuple[int, int] | None) -> np.ndarray:
    """(4, 4) float64 view-to-clip matrix of `world_to_clip`."""
    if camera.intrinsics is None:
        width, height = (1, 1) if image_size is None else image_width_height(image_size)
        f = 1.0 / math.tan(math.radians(camera.fov_degrees) / 2)  # fy = H / (2 tan): 2 fy / H
        scale_x = f if width == height else f * height / width  # square: exactly the matrix of old releases
        scale_y, shift_x, shift_y = f, 0.0, 0.0
    else:
        width, height = image_width_height(image_size)  # type: ignore[arg-type]  # not None: checked above
        fx, fy, cx, cy = camera.intrinsics
        scale_x, scale_y, shift_x, shift_y = 2 * fx / width, 2 * fy / height, 2 * cx / width - 1, 1 - 2 * cy / height
    n, far = camera.znear, camera.zfar
    return np.array(
        [
            [-scale_x, 0, shift_x, 0],
            [0, scale_y, shift_y, 0],
            [0, 0, (far + n) / (far - n), -2 * far * n / (far - n)],
            [0, 0, 1, 0],  # w = view-frame depth
        ]
    )


def _look_at(camera: Camera) -> np.ndarray:
    """(4, 4) float64: `_look_ats` at the camera's own eye."""
    return _look_ats(camera, np.asarray([camera.eye]))[0]


def _look_ats(camera: Camera, eyes: np.ndarray) -> np.ndarray:
    """(B, 4, 4) float64 column-vector world-to-view matrices of PyTorch3D's `look_at_view_transform` for the camera
    moved to each of `eyes` (B, 3), in closed form: rows x, y, z of the view frame (z from the eye towards `at`,
    x = up x z, y = z x x) and the translation -axis . eye. Why not PyTorch3D's own: its transform objects cost
    about 2 ms a call, and a batch of scenes each with its own (randomised) eye made that the most of an OpenGL
    render. Where up is parallel to the viewing direction PyTorch3D substitutes an axis: that rare case is left to
    it (tests compare the two)."""
    eyes = np.asarray(eyes, dtype=np.float64).reshape(-1, 3)
    at, up = (np.asarray(v, dtype=np.float64) for v in (camera.at, camera.up))

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-5)  # PyTorch3D's F.normalize(eps=1e-5)

    z = unit(at - eyes)
    x = unit(np.cross(up, z))
    y = unit(np.cross(z, x))
    view = np.zeros((len(eyes), 4, 4))
    view[:, :3, :3] = np.stack([x, y, z], 1)  # rows are the view axes in world coordinates
    view[:, :3, 3] = -np.einsum("bij,bj->bi", view[:, :3, :3], eyes)
    view[:, 3, 3] = 1.0
    for b in np.nonzero(np.all(np.abs(x) <= 5e-3, axis=1))[0]:  # degenerate: PyTorch3D's replacement axis
        moved = replace(camera, eye=(float(eyes[b, 0]), float(eyes[b, 1]), float(eyes[b, 2])))
        matrix = pytorch3d_cameras(moved, 1, torch.device("cpu")).get_world_to_view_transform().get_matrix()[0]
        view[b] = matrix.T.double().numpy()  # PyTorch3D multiplies row vectors; transpose for column vectors
    return view


def _check_windows(windows: torch.Tensor, batch: int, size: tuple[int, int]) -> None:
    """ValueError unless windows is a LongTensor (batch, 4) of boxes 0 <= u0 < u1 <= W, 0 <= v0 < v1 <= H."""
    W, H = size
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.long or tuple(windows.shape) != (batch, 4):
        got = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must be a LongTensor of shape ({batch}, 4), got {got}")
    u0, v0, u1, v1 = windows.unbind(1)
    if not bool(((0 <= u0) & (u0 < u1) & (u1 <= W) & (0 <= v0) & (v0 < v1) & (v1 <= H)).all()):
        raise ValueError(f"windows must be pixel boxes (u0, v0, u1, v1) with 0 <= u0 < u1 <= {W}, 0 <= v0 < v1 <= {H}")


def _framed(clip: np.ndarray, corner: np.ndarray, tile: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Column-major world-to-clip matrices (B, 16) of a (W, H) image -> those that map its pixels
    [u0, u0 + w) x [v0, v0 + h) (corner (B, 2) = (u0, v0), tile = (w, h)) onto a whole w x h tile:
    x' = (x - c_x clip_w) W / w and y' = (y - c_y clip_w) H / h, (c_x, c_y) the window's centre in the image's
    normalised device coordinates (y up). Pixel centres stay pixel centres: a window draws what the whole image
    draws there."""
    (W, H), (w, h), B = size, tile, clip.shape[0]
    cx = (2 * corner[:, 0] + w) / W - 1
    cy = 1 - (2 * corner[:, 1] + h) / H
    frame = np.zeros((B, 4, 4))
    frame[:, 0, 0], frame[:, 0, 3] = W / w, -cx * W / w
    frame[:, 1, 1], frame[:, 1, 3] = H / h, -cy * H / h
    frame[:, 2, 2] = frame[:, 3, 3] = 1.0
    matrices = clip.reshape(B, 4, 4).transpose(0, 2, 1)  # column-major rows -> matrices
    return (frame @ matrices).transpose(0, 2, 1).reshape(B, 16)


class OpenGLRenderer(torch.nn.Module):
    """Forward-only hard renderer with the call shape of `renderers.mesh.MeshRenderer3D` (no gradients: wrap
    it in `renderers.finite_difference.FiniteDifferenceRenderer` for those)."""

    def __init__(self, library: MeshLibrary, stage: Stage, settings: OpenGLSettings | None = None):
        super().__init__()
        self.stage = stage
        self.yaw_invariant = library.yaw_invariant  # drawn at yaw 0, as MeshRenderer3D does
        self.settings = settings or OpenGLSettings()
        self.ctx = _context(self.settings.egl_device)
        self.program = self.ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        # the table last: meshes[k] is shape k, meshes[-1] the table
        self._meshes = [self._mesh_buffers(v, f) for v, f in zip(library.verts, library.faces, strict=True)]
        self._meshes.append(self._mesh_buffers(stage.table_verts, stage.table_faces))
        self._instanced: list[tuple[Any, Any, int] | None] = [None] * len(self._meshes)  # (vao, buffer, rows)
        self._framebuffer_parts: tuple[Any, Any, Any] | None = None  # (framebuffer, colour, depth), see `_framebuffer`
        direction = np.asarray(stage.light.direction, dtype=np.float64)
        self._nominal_light = np.r_[direction / np.linalg.norm(direction), stage.light.ambient]  # (4,)
        self._nominal_clip = world_to_clip(stage.camera, self.settings.image_size).T.reshape(16)  # column-major
        boxes = [torch.stack([v.amin(0), v.amax(0)]).double().numpy() for v in library.verts]  # (2, 3) each
        index = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])  # (8, 3)
        corners = [b[index, np.arange(3)] for b in boxes]  # (8, 3): the box's corners, object frame
        self._corners = np.stack(corners) if corners else np.zeros((0, 8, 3))  # (K, 8, 3)
        self._invariant = np.array([*self.yaw_invariant, *[False] * (len(corners) + 1)])  # (> K,) drawn at yaw 0

    def _framebuffer(self, width: int, height: int):
        """One float framebuffer of at least this size, drawn into and read from its bottom-left (0, 0, width,
        height): grown when a call needs more, its colour and depth renderbuffers released with it.

        One, not one per size: a tile layout's size follows the batch and, for windowed renders, each call's largest
        window, so a framebuffer per size grew without bound (on a 96 x 128 world, ~0.85 GB and ~90 sizes more per
        `infer` of 32 images with the structure search). Made from explicit renderbuffers because
        `Framebuffer.release()` does not release the ones `simple_framebuffer` attaches (3 MB a call at 64 px).
        A viewport at the origin of a larger framebuffer maps NDC to the same window coordinates as a framebuffer of
        the viewport's size, so the pixels are the same."""
        old = self._framebuffer_parts
        if old is not None and old[0].width >= width and old[0].height >= height:
            return old[0]
        if old is not None:
            width, height = max(width, old[0].width), max(height, old[0].height)
        color = self.ctx.renderbuffer((width, height), components=4, dtype="f4")
        depth = self.ctx.depth_renderbuffer((width, height))
        fbo = self.ctx.framebuffer([color], depth)
        self._framebuffer_parts = (fbo, color, depth)
        for part in old or ():  # after the new one is made: making it rebinds the bound framebuffer, and a
            part.release()  # released one there leaves GL_INVALID_OPERATION for the next GL user to find
        return fbo

    def _mesh_buffers(self, verts: torch.Tensor, faces: torch.Tensor) -> tuple[Any, Any]:
        """Interleaved (position, normal) float32 vertices and uint32 triangle indices, as GL buffers."""
        normals = vertex_normals(verts.double(), faces).float()
        data = torch.cat([verts.float(), normals], dim=1).numpy()  # (V, 6)
        vbo = self.ctx.buffer(np.ascontiguousarray(data, dtype="f4").tobytes())
        return vbo, self.ctx.buffer(faces.numpy().astype("u4").tobytes())

    def _vertex_array(self, mesh: int, rows: int):
        """Mesh `mesh`'s vertex array with an instance buffer of at least `rows` instances (grown by doubling; the
        buffers are kept, as framebuffers are, since releasing GL objects every call is what leaked before)."""
        held = self._instanced[mesh]
        if held is None or held[2] < rows:
            if held is not None:
                held[0].release()
                held[1].release()
            capacity = max(64, 1 << (rows - 1).bit_length())
            buffer = self.ctx.buffer(reserve=capacity * _INSTANCE_FLOATS * 4)
            vbo, ibo = self._meshes[mesh]
            content = [(vbo, "3f 3f", "in_position", "in_normal"), (buffer, _INSTANCE_FORMAT, *_INSTANCE_ATTRIBUTES)]
            held = (self.ctx.vertex_array(self.program, content, ibo), buffer, capacity)
            self._instanced[mesh] = held
        return held

    def _scene_uniforms(self, B: int, appearance: Appearance | None) -> dict[str, np.ndarray]:
        """Each scene's light (B, 4) (unit direction, ambient), diffuse (B,), table albedo (B, 3) and world-to-clip
        matrix (B, 16), column-major: the nominal stage where `appearance` leaves a field None."""

        def rows(name: str) -> np.ndarray | None:
            value = None if appearance is None else getattr(appearance, name)
            return None if value is None else value.detach().cpu().double().numpy()

        stage, light = self.stage, np.tile(self._nominal_light, (B, 1))
        direction, ambient, diffuse, table, eye = (rows(n) for n in ("light_direction", "ambient", "diffuse",
                                                                      "table_color", "eye"))  # fmt: skip
        if direction is not None:
            light[:, :3] = direction / np.linalg.norm(direction, axis=1, keepdims=True)
        if ambient is not None:
            light[:, 3] = ambient
        clip = np.tile(self._nominal_clip, (B, 1))
        if eye is not None and B > 0:  # a per-scene camera (randomised training renders, a fitted eye): a matrix each
            clip = self._clips(eye)
        return {
            "light": light,
            "diffuse": np.full(B, stage.light.diffuse) if diffuse is None else diffuse,
            "table": np.tile(np.asarray(stage.table_color), (B, 1)) if table is None else table,
            "clip": clip,
        }

    @torch.no_grad()
    def object_boxes(
        self, shape_ids: torch.Tensor, positions: torch.Tensor, yaws: torch.Tensor, eye: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pixel boxes that hold each object's image: the projection of its posed object-frame bounding box, widened
        to whole pixels plus one, seen from the camera at `eye` (FloatTensor (B, 3), each scene's camera centre as
        `Appearance.eye` gives it; None: the stage's camera).

        Args:
            shape_ids: LongTensor (B, N), -1 for empty slots; positions: FloatTensor (B, N, 2); yaws: (B, N).
        Returns:
            LongTensor (B, N, 4) (u0, v0, u1, v1): columns u0 <= u < u1 and rows v0 <= v < v1 (from the top left),
            clipped to the image; the whole image for an empty slot or a box reaching behind the camera.
        """
        ids = shape_ids.cpu().numpy()
        xy, yaw = positions.detach().cpu().double().numpy(), yaws.detach().cpu().double().numpy()
        clip = None if eye is None else self._clips(eye.detach().cpu().double().numpy())
        return torch.from_numpy(self._boxes(ids, xy, yaw, clip)).to(shape_ids.device)

    def _clips(self, eye: np.ndarray) -> np.ndarray:
        """(B, 16) column-major world-to-clip matrices of the stage's camera moved to each `eye` (B, 3)."""
        size, camera = self.settings.image_size, self.stage.camera
        return world_to_clips(camera, size, eye).transpose(0, 2, 1).reshape(-1, 16)

    def _boxes(self, ids: np.ndarray, xy: np.ndarray, yaw: np.ndarray, clip: np.ndarray | None = None) -> np.ndarray:
        """`object_boxes` on numpy arrays (B, N), (B, N, 2), (B, N) and each scene's world-to-clip matrix (B, 16)
        (None: the nominal one) -> int64 (B, N, 4) (numpy: small arrays, many calls)."""
        W, H = self.settings.width, self.settings.height
        k = np.maximum(ids, 0)
        angle = np.where(self._invariant[k], 0.0, yaw)
        c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]  # (B, N, 1)
        local = self._corners[k]  # (B, N, 8, 3)
        x = c * local[..., 0] - s * local[..., 1] + xy[..., 0:1]
        y = s * local[..., 0] + c * local[..., 1] + xy[..., 1:2]
        m = (self._nominal_clip if clip is None else clip).reshape(-1, 1, 1, 4, 4)  # column-major: [x, y, z, 1] @ m
        cx, cy, cw = (x * m[..., 0, i] + y * m[..., 1, i] + local[..., 2] * m[..., 2, i] + m[..., 3, i]
                      for i in (0, 1, 3))  # fmt: skip
        u = (cx / cw + 1) * W / 2
        v = (1 - cy / cw) * H / 2
        box = np.stack([np.floor(u.min(-1)) - 1, np.floor(v.min(-1)) - 1, np.ceil(u.max(-1)) + 1,
                        np.ceil(v.max(-1)) + 1], -1)  # fmt: skip
        box = np.clip(box, 0, [W, H, W, H])
        whole = ((ids < 0) | (cw <= 0).any(-1))[..., None]
        return np.where(whole, np.array([0, 0, W, H]), box).astype(np.int64)

    @torch.no_grad()
    def forward(
        self,
        shape_ids: torch.Tensor,
        positions: torch.Tensor,
        yaws: torch.Tensor,
        colors: torch.Tensor | None = None,
        appearance: Appearance | None = None,
        windows: torch.Tensor | None = None,
        background: torch.Tensor | None = None,
    ) -> RenderOutput:
        """Same arguments and output as `MeshRenderer3D.forward` (images carry no gradient), and optionally

        windows: LongTensor (B, 4) pixel boxes (u0, v0, u1, v1) as `object_boxes` gives them: each scene is drawn
            only in a tile of the largest window's size that holds its window (at the window's top left, moved
            left or up where it would leave the image; the camera matrix maps that part of the image onto the
            tile), so the cost is that of the windows' pixels, e.g. to redraw where one object moved. Outside its
            tile an image is `background` (FloatTensor (B, 3, H, W), e.g. the scenes' renders before the move)
            or, without it, the stage's background colour, and its object mask False. None: the whole images.
        Returns:
            RenderOutput with images FloatTensor (B, 3, H, W) in [0, 1] and object_mask BoolTensor (B, H, W),
            on the device of `positions`.
        """
        if windows is None or shape_ids.shape[0] == 0:
            rgba, _ = self._rgba(shape_ids, positions, yaws, colors, appearance)
            images, mask = rgba[:, :3].clamp(0.0, 1.0), rgba[:, 3] > 0.5
        else:
            tiles, corner = self.tiles(shape_ids, positions, yaws, colors, appearance, windows)
            size = (self.settings.width, self.settings.height)
            images, mask = self._paste(tiles.images, tiles.object_mask, corner, size, background)
        return RenderOutput(images=images.to(positions.device), object_mask=mask.to(positions.device))

    @torch.no_grad()
    def tiles(
        self,
        shape_ids: torch.Tensor,
        positions: torch.Tensor,
        yaws: torch.Tensor,
        colors: torch.Tensor | None,
        appearance: Appearance | None,
        windows: torch.Tensor,
    ) -> tuple[RenderOutput, torch.Tensor]:
        """The tiles `forward(..., windows=windows)` draws, without pasting them into whole images: RenderOutput
        with images (B, 3, h, w) and object_mask (B, h, w), (w, h) the largest window's size, and LongTensor
        (B, 2) the (u, v) of each tile's top left pixel in the image (CPU). Cheaper than `forward` when only the
        windows' pixels are wanted (e.g. many trial placements of one object, compared there)."""
        rgba, corner = self._rgba(shape_ids, positions, yaws, colors, appearance, windows)
        device = positions.device
        out = RenderOutput(images=rgba[:, :3].clamp(0.0, 1.0).to(device), object_mask=(rgba[:, 3] > 0.5).to(device))
        return out, corner if corner is not None else torch.zeros(0, 2, dtype=torch.long)

    def _rgba(self, shape_ids, positions, yaws, colors, appearance, windows=None):
        """(float32 CPU tensor (B, 4, h, w) RGBA, None): the whole images; with `windows`, (the tiles, LongTensor
        (B, 2) their top left pixels)."""
        B, W, H, tiles = shape_ids.shape[0], self.settings.width, self.settings.height, self.settings.max_tiles
        if appearance is not None:
            appearance.validate(B)
            appearance = None if appearance.is_nominal() else appearance
        ids, pos = shape_ids.cpu().numpy(), positions.detach().cpu().double().numpy()
        yaw = yaws.detach().cpu().double().numpy()
        if colors is None:
            albedo = np.tile(np.asarray(self.stage.object_color, dtype=np.float64), (*ids.shape, 1))
        else:
            albedo = colors.detach().cpu().double().numpy()
        scene = self._scene_uniforms(B, appearance)
        tile, corner = (W, H), None
        if windows is not None and B > 0:
            _check_windows(windows, B, (W, H))
            w, h = (int(v) for v in (windows[:, 2:] - windows[:, :2]).amax(0).tolist())
            tile = (w, h)
            corner = torch.minimum(windows[:, :2].cpu(), torch.tensor([W - w, H - h]))  # (B, 2): tiles in the image
            boxes = self._boxes(ids, pos, yaw, scene["clip"])  # (B, N, 4), under each scene's camera
            scene["clip"] = _framed(scene["clip"], corner.numpy(), tile, (W, H))
            low = corner.numpy()[:, None]
            high = low + np.array([w, h])  # (B, 1, 2): the tiles' pixels
            outside = (boxes[..., 2:] <= low).any(-1) | (boxes[..., :2] >= high).any(-1)  # (B, N)
            ids = np.where(outside, -1, ids)  # an object outside a tile draws none of its pixels
        chunks = [np.zeros((0, 4, tile[1], tile[0]), dtype=np.float32)]
        for i in range(0, B, tiles):
            part = slice(i, i + tiles)
            chunks.append(self._render_tiles(ids[part], pos[part], yaw[part], albedo[part],
                                             {k: v[part] for k, v in scene.items()}, tile))  # fmt: skip
        return torch.from_numpy(chunks[1] if len(chunks) == 2 else np.concatenate(chunks)), corner

    def _paste(self, images: torch.Tensor, mask: torch.Tensor, corner: torch.Tensor, size: tuple[int, int],
               background: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Tiles (B, 3, h, w) and their masks (B, h, w) put at their top left corners (B, 2) into `background`
        (B, 3, H, W; None: the stage's background colour) and empty masks: (B, 3, H, W), (B, H, W)."""
        (B, _, h, w), (W, H) = images.shape, size
        if background is None:
            full = torch.tensor(self.stage.background_color, dtype=images.dtype)[None, :, None, None]
            full = full.expand(B, 3, H, W).clone()
        else:
            full = background.detach().to("cpu", images.dtype, copy=True).reshape(B, 3, H, W)
        full_mask = torch.zeros(B, H, W, dtype=torch.bool)
        for b, (x, y) in enumerate(corner.tolist()):  # a slice copy per tile: cheaper than index arrays here
            full[b, :, y : y + h, x : x + w] = images[b]
            full_mask[b, y : y + h, x : x + w] = mask[b]
        return full, full_mask

    def _render_tiles(self, ids, pos, yaw, albedo, scene: dict[str, np.ndarray], tile: tuple[int, int]) -> np.ndarray:
        """Draw b scenes (numpy (b, N), (b, N, 2), (b, N), (b, N, 3); `_scene_uniforms` rows) as tiles of (w, h) =
        `tile` pixels in one framebuffer, one instanced draw per mesh; float32 (b, 4, h, w)."""
        (W, H), b = tile, ids.shape[0]
        cols = math.ceil(math.sqrt(b))
        rows = math.ceil(b / cols)
        fbo = self._framebuffer(cols * W, rows * H)
        fbo.use()
        fbo.viewport = (0, 0, cols * W, rows * H)
        self.ctx.enable(self.ctx.DEPTH_TEST)
        for plane in range(4):
            self.ctx.enable_direct(_GL_CLIP_DISTANCE0 + plane)
        fbo.clear(*self.stage.background_color, 0.0, depth=1.0, viewport=(0, 0, cols * W, rows * H))
        self.program["tile_scale"].value = (1.0 / cols, 1.0 / rows)
        index = np.arange(b)
        offset = np.stack([(2 * (index % cols) + 1) / cols - 1, (2 * (index // cols) + 1) / rows - 1], 1)  # (b, 2)
        per_scene = np.concatenate([scene["light"], scene["diffuse"][:, None], offset, scene["clip"]], 1)  # (b, 23)
        table = np.concatenate([np.tile([1.0, 0.0, 0.0, 0.0], (b, 1)), scene["table"], np.zeros((b, 1)), per_scene], 1)
        self._draw(len(self._meshes) - 1, table)
        s, n = np.nonzero(ids >= 0)  # the objects: scene and slot of each
        k = ids[s, n]
        angle = np.where(self._invariant[k], 0.0, yaw[s, n])
        pose = np.concatenate([np.cos(angle)[:, None], np.sin(angle)[:, None], pos[s, n]], 1)  # (M, 4)
        objects = np.concatenate([pose, albedo[s, n], np.ones((len(s), 1)), per_scene[s]], 1)  # (M, 31)
        for shape in np.unique(k):
            self._draw(int(shape), objects[k == shape])
        data = np.frombuffer(fbo.read((0, 0, cols * W, rows * H), components=4, dtype="f4"), dtype=np.float32)
        grid = data.reshape(rows, H, cols, W, 4)[:, ::-1]  # OpenGL's row 0 is the bottom; flip to top-first
        tiles = grid.transpose(0, 2, 4, 1, 3).reshape(rows * cols, 4, H, W)[:b]  # (b, 4, H, W)
        return np.ascontiguousarray(tiles)

    def _draw(self, mesh: int, instances: np.ndarray) -> None:
        """One instanced draw of mesh `mesh` (a shape id, or the table last), float (M, 31) `instances` rows."""
        if len(instances) == 0:
            return
        vao, buffer, _ = self._vertex_array(mesh, len(instances))
        buffer.write(np.ascontiguousarray(instances, dtype="f4").tobytes())
        vao.render(instances=len(instances))
