"""Reading a world file (TOML) or a world dict (`World.to_dict`), every key validated.

The format and every key's meaning, unit and default are in docs/tabletop.md; the defaults live here, once.
Errors are `WorldError` (a ValueError) naming the file and the key: `kitchen.toml: objects[2].scale: must be
> 0, got -1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import trimesh

from scenes import world_meshes
from scenes.world_parts import WorldCamera, unit

__all__ = ["WorldError", "Reader", "parse_file_objects", "parse_dict_objects", "parse_camera", "depth_reach", "FORMAT"]

FORMAT = "inverse-graphics-world/1"  # the `format` tag of `World.to_dict`
DEFAULT_OBJECT_COLOR = (0.95, 0.95, 0.95)  # albedo of an object without `color` (the renderers' default)
DEFAULT_TABLE_COLOR = (0.45, 0.45, 0.45)


class WorldError(ValueError):
    """A world file or world dict that cannot be used; the message names the file and the key."""


@dataclass
class Reader:
    """Typed access to one table of a world file, with errors that name `source` and the key path."""

    source: str  # file name (or "world dict") for messages
    data: dict
    path: str = ""  # key path of `data`, e.g. "objects[2]"

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, message: str) -> WorldError:
        return WorldError(f"{self.source}: {self.key(name)}: {message}")

    def check_keys(self, allowed) -> None:
        """WorldError for the first key not in `allowed` (typos must not be ignored silently)."""
        for name in self.data:
            if name not in allowed:
                where = f"{self.path}: " if self.path else ""
                raise WorldError(f"{self.source}: {where}unknown key {name!r}; known keys: {', '.join(allowed)}")

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = None, required: bool = False) -> Any:
        if name not in self.data:
            if required:
                raise self.fail(name, "missing (required)")
            return default
        return self.data[name]

    def number(self, name: str, default: float | None = None, *, required: bool = False, low: float | None = None,
               low_open: bool = False, high: float | None = None) -> float:  # fmt: skip
        value = self.raw(name, default, required)
        return self._number(name, value, low, low_open, high)

    def _number(self, name: str, value: Any, low: float | None, low_open: bool, high: float | None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise self.fail(name, f"must be finite, got {value!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise self.fail(name, f"must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        if high is not None and value > high:
            raise self.fail(name, f"must be <= {high:g}, got {value:g}")
        return value

    def integer(self, name: str, default: int | None = None, *, required: bool = False, low: int | None = None,
                high: int | None = None) -> int:  # fmt: skip
        value = self.raw(name, default, required)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be a whole number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise self.fail(name, f"must be {bounds}, got {value}")
        return value

    def vector(self, name: str, length: int, default: tuple | None = None, *, required: bool = False,
               low: float | None = None, low_open: bool = False,
               high: float | None = None) -> tuple[float, ...]:  # fmt: skip
        value = self.raw(name, default, required)
        if not isinstance(value, list | tuple) or len(value) != length:
            raise self.fail(name, f"must be a list of {length} numbers, got {value!r}")
        return tuple(self._number(f"{name}[{i}]", v, low, low_open, high) for i, v in enumerate(value))

    def color(self, name: str, default: tuple) -> tuple[float, float, float]:
        r, g, b = self.vector(name, 3, default, low=0.0, high=1.0)
        return r, g, b

    def string(self, name: str, default: str | None = None, *, required: bool = False, choices=None) -> str:
        value = self.raw(name, default, required)
        if not isinstance(value, str) or not value:
            raise self.fail(name, f"must be a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.fail(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {value!r}")
        return value

    def table(self, name: str, required: bool = False) -> Reader | None:
        value = self.raw(name, None, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, f"must be a table, got {value!r}")
        return Reader(self.source, value, self.key(name))

    def tables(self, name: str) -> list[Reader]:
        value = self.raw(name, required=True)
        if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
            raise self.fail(name, "must be a non-empty array of tables ([[objects]] sections)")
        return [Reader(self.source, v, f"{self.key(name)}[{i}]") for i, v in enumerate(value)]


def read_toml(path: Path) -> dict:
    """The TOML file as a dict; WorldError for a missing or malformed file. tomllib builds plain data only."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as err:
        raise WorldError(f"no world file {str(path)!r}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise WorldError(f"{path.name}: cannot read it as UTF-8 text: {err}") from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise WorldError(f"{path.name}: not valid TOML: {err}") from err


OBJECT_FILE_KEYS = ("name", "mesh", "scale", "up_axis", "recenter", "primitive", "color", "yaw_symmetry")


def _yaw_symmetry(r: Reader, mesh: trimesh.Trimesh) -> float:
    """The object's yaw period in radians from `yaw_symmetry` ("auto" detects it from the mesh)."""
    value = r.raw("yaw_symmetry", "auto")
    if value == "auto":
        return world_meshes.detect_yaw_period(mesh)
    if value == "none":
        return 2 * math.pi
    degrees = r.number("yaw_symmetry", low=0.0, high=360.0) if not isinstance(value, str) else None
    if degrees is None:
        raise r.fail("yaw_symmetry", f'must be "auto", "none" or degrees in [0, 360], got {value!r}')
    if degrees == 0.0:
        return 0.0
    turns = 360.0 / degrees
    if abs(turns - round(turns)) > 1e-6:
        raise r.fail("yaw_symmetry", f"must divide 360 degrees a whole number of times, got {degrees:g}")
    return 2 * math.pi / round(turns)


def _object_mesh(r: Reader, base_dir: Path | None) -> tuple[trimesh.Trimesh, str]:
    """(mesh in the object frame, a description of its source) from `mesh` or `primitive` and their keys."""
    if r.has("mesh") == r.has("primitive"):
        raise WorldError(f"{r.source}: {r.path}: give exactly one of `mesh` (a file) or `primitive`")
    if r.has("primitive"):
        kind = r.string("primitive", choices=tuple(world_meshes.PRIMITIVE_SIZES))
        spec = world_meshes.PRIMITIVE_SIZES[kind]
        r.check_keys(("name", "primitive", "color", "yaw_symmetry", *spec))
        sizes: dict[str, Any] = {}
        for key, (kind_of, default) in spec.items():
            if kind_of == "vec3":
                sizes[key] = r.vector(key, 3, default, required=default is None, low=0.0, low_open=True)
            elif kind_of == "int":
                low, high = (1, 5) if key == "subdivisions" else (3, 256)  # icosphere levels; polygon sides
                sizes[key] = r.integer(key, default, low=low, high=high)
            else:
                sizes[key] = r.number(key, default, required=default is None, low=0.0, low_open=True)
        return world_meshes.primitive_mesh(kind, **sizes), f"primitive {kind}"
    r.check_keys(OBJECT_FILE_KEYS)
    relative = r.string("mesh")
    scale = r.number("scale", 1.0, low=0.0, low_open=True)
    up_axis = r.string("up_axis", "z", choices=("z", "y"))
    recenter = r.boolean("recenter", False)
    path = Path(relative) if base_dir is None else base_dir / relative
    if not path.is_file():
        raise r.fail("mesh", f"no such file {relative!r} (looked for {str(path)!r}; paths are relative to the "
                             "world file)")  # fmt: skip
    try:
        raw = world_meshes.read_mesh_file(path)
    except (ValueError, OSError) as err:
        raise r.fail("mesh", f"{relative!r}: {err}") from err
    return world_meshes.prepare_mesh(raw, scale, up_axis, recenter), relative


def parse_file_objects(objects: list[Reader], base_dir: Path | None):
    """(name, mesh, color, yaw_period, source) for each [[objects]] table of a world file."""
    parsed, names = [], set()
    for r in objects:
        name = r.string("name", required=True)
        if name in names:
            raise r.fail("name", f"{name!r} is used by an earlier object; names must be unique")
        names.add(name)
        mesh, source = _object_mesh(r, base_dir)
        color = r.color("color", DEFAULT_OBJECT_COLOR)
        parsed.append((name, mesh, color, _yaw_symmetry(r, mesh), source))
    return parsed


def parse_dict_objects(objects: list[Reader]):
    """(name, mesh, color, yaw_period, source) for each object of a `World.to_dict` dict (geometry inline)."""
    parsed = []
    for r in objects:
        r.check_keys(("name", "source", "color", "yaw_period", "vertices", "faces"))
        name, source = r.string("name", required=True), r.string("source", required=True)
        color = r.color("color", DEFAULT_OBJECT_COLOR)
        period = r.number("yaw_period", required=True, low=0.0, high=2 * math.pi)
        try:
            verts = np.asarray(r.raw("vertices", required=True), dtype=np.float64)
            faces = np.asarray(r.raw("faces", required=True), dtype=np.int64)
        except (TypeError, ValueError) as err:
            raise r.fail("vertices", f"vertices and faces must be lists of numbers: {err}") from err
        if verts.ndim != 2 or verts.shape[1] != 3 or not np.isfinite(verts).all():
            raise r.fail("vertices", f"must be a list of finite [x, y, z], got shape {verts.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0 or faces.min() < 0 or faces.max() >= len(verts):
            raise r.fail("faces", "must be a non-empty list of [i, j, k] indices into vertices")
        mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=False)
        parsed.append((name, mesh, color, period, source))
    return parsed


def parse_camera(r: Reader, image_size: tuple[int, int], reach: tuple[float, float]) -> WorldCamera:
    """[camera]: eye, at, up, znear, zfar and fov_degrees or fx, fy (cx, cy default to the image centre)."""
    r.check_keys(("eye", "at", "up", "fov_degrees", "fx", "fy", "cx", "cy", "znear", "zfar"))
    eye = r.vector("eye", 3, required=True)
    at = r.vector("at", 3, (0.0, 0.0, 0.0))
    up = r.vector("up", 3, (0.0, 0.0, 1.0))
    axis = np.subtract(at, eye)
    if np.linalg.norm(axis) < 1e-9:
        raise r.fail("at", "must differ from eye")
    if np.linalg.norm(np.cross(unit(axis), up)) < 1e-6:
        raise r.fail("up", "must not be parallel to the viewing direction (at - eye)")
    has_fov, has_pixel = r.has("fov_degrees"), any(r.has(k) for k in ("fx", "fy", "cx", "cy"))
    if has_fov == has_pixel:
        raise WorldError(f"{r.source}: {r.path}: give either fov_degrees or the intrinsics fx, fy (cx, cy)")
    fov = r.number("fov_degrees", low=0.0, low_open=True, high=179.0) if has_fov else None
    pixel = None
    if has_pixel:
        W, H = image_size
        fx = r.number("fx", required=True, low=0.0, low_open=True)
        fy = r.number("fy", required=True, low=0.0, low_open=True)
        pixel = (fx, fy, r.number("cx", W / 2), r.number("cy", H / 2))
    near_default, far_default = reach
    znear = r.number("znear", near_default, low=0.0, low_open=True)
    zfar = r.number("zfar", far_default, low=0.0, low_open=True)
    if zfar <= znear:
        raise r.fail("zfar", f"must be > znear ({znear:g}), got {zfar:g}")
    return WorldCamera(eye, at, up, znear, zfar, image_size, fov, pixel)  # type: ignore[arg-type]


def depth_reach(eye, table_size, height: float) -> tuple[float, float]:
    """Default (znear, zfar): half the nearest and 1.5 x the farthest distance from the eye to the box of the
    table and the tallest object (distances bound depths from above)."""
    hx, hy = table_size[0] / 2, table_size[1] / 2
    corners = np.array([[x, y, z] for x in (-hx, hx) for y in (-hy, hy) for z in (0.0, height)])
    nearest = np.clip(eye, corners.min(0), corners.max(0))
    near = float(np.linalg.norm(np.subtract(eye, nearest)))
    far = float(np.linalg.norm(corners - np.asarray(eye), axis=1).max())
    return max(0.5 * near, 0.01), 1.5 * far
