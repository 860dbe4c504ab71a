"""The World: file parsing and validation, mesh formats and units, symmetry detection, sampler, randomisation,
serialisation, rendering (non-square, intrinsics) and the built-in worlds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from renderers.mesh import Camera
from scenes import tabletop, world_meshes
from scenes.world import World, WorldError, load_world
from tests.conftest import assert_close

SMALL_WORLD = """
name = "small"
image_size = [48, 32]
objects_per_scene = [1, 3]
[camera]
eye = [0.0, -0.5, 0.6]
fx = 50.0
fy = 52.0
cx = 23.0
cy = 17.0
[light]
direction = [0.3, -0.2, 1.0]
ambient = 0.3
diffuse = 0.7
[table]
size = [0.5, 0.4]
color = [0.5, 0.4, 0.3]
[randomize]
brightness = 0.2
light_direction_degrees = 25
ambient = 0.1
object_color = 0.1
table_color = 0.05
camera_position = 0.03
pixel_noise = 0.01
[[objects]]
name = "block"
mesh = "block.stl"
scale = 0.001
color = [0.9, 0.2, 0.2]
[[objects]]
name = "ball"
primitive = "sphere"
radius = 0.04
color = [0.2, 0.3, 0.9]
"""


def write_world(tmp_path: Path, text: str = SMALL_WORLD, name: str = "small.toml") -> Path:
    """A world file and the 80 x 40 x 30 mm block (STL, millimetres) it refers to."""
    block = trimesh.creation.box(extents=(80.0, 40.0, 30.0))
    block.export(tmp_path / "block.stl")
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> World:
    return load_world(write_world(tmp_path_factory.mktemp("world")))


# ---- parsing -----------------------------------------------------------------------------------------------
def test_a_world_file_loads_with_every_key(small):
    assert small.name == "small" and small.image_size == (48, 32) and small.objects_per_scene == (1, 3)
    assert small.camera.intrinsics() == (50.0, 52.0, 23.0, 17.0)
    assert small.light.direction == (0.3, -0.2, 1.0) and (small.light.ambient, small.light.diffuse) == (0.3, 0.7)
    assert small.table.size == (0.5, 0.4) and small.table.color == (0.5, 0.4, 0.3)
    assert small.randomize is not None and small.randomize.camera_position == 0.03
    block, ball = small.objects
    assert (block.name, block.color, ball.name) == ("block", (0.9, 0.2, 0.2), "ball")
    assert_close(np.array(block.mesh.extents), [0.08, 0.04, 0.03], atol=1e-12)  # millimetres -> metres
    assert block.mesh.bounds[0, 2] == 0.0 and ball.mesh.bounds[0, 2] == pytest.approx(0.0, abs=1e-12)
    assert block.yaw_period == pytest.approx(math.pi) and ball.yaw_period == 0.0  # "auto" by default


def test_defaults_when_optional_keys_are_absent(tmp_path):
    text = '[camera]\neye = [0, -0.5, 0.6]\nfov_degrees = 45\n[table]\nsize = [0.5, 0.5]\n' \
           '[[objects]]\nname = "c"\nprimitive = "cube"\nsize = 0.1\n'  # fmt: skip
    w = load_world(write_world(tmp_path, text, "bare.toml"))
    assert w.name == "bare" and w.image_size == (64, 64) and w.objects_per_scene == (0, 3) and w.randomize is None
    assert w.camera.at == (0.0, 0.0, 0.0) and w.camera.up == (0.0, 0.0, 1.0)
    assert 0 < w.camera.znear < 0.5 < 0.9 < w.camera.zfar  # derived from the table: it is 0.6-0.95 m away
    assert w.objects[0].color == (0.95, 0.95, 0.95) and w.objects[0].yaw_period == pytest.approx(math.pi / 2)


BAD_KEYS = [  # (edit of SMALL_WORLD, the key the error must name, words it must contain)
    (("scale = 0.001", "scale = -1"), "objects[0].scale", "must be > 0, got -1"),
    (("scale = 0.001", "scale = 0.001\nsclae = 2"), "objects[0]", "unknown key 'sclae'"),
    (("pixel_noise = 0.01", "pixel_noise = 0.01\nhue = 1"), "randomize", "unknown key 'hue'"),
    (('name = "small"', 'name = "small"\ntitle = "x"'), "", "unknown key 'title'"),
    (("image_size = [48, 32]", "image_size = [48]"), "image_size", "list of 2"),
    (("image_size = [48, 32]", "image_size = [48.5, 32]"), "image_size", "whole pixels"),
    (("objects_per_scene = [1, 3]", "objects_per_scene = [3, 1]"), "objects_per_scene", "min <= max"),
    (("objects_per_scene = [1, 3]", "objects_per_scene = [0, 40]"), "objects_per_scene", "may not fit"),
    (("fx = 50.0", "fx = -5.0"), "camera.fx", "> 0"),
    (("fx = 50.0", 'fx = "wide"'), "camera.fx", "must be a number"),
    (("fx = 50.0\nfy = 52.0", "fov_degrees = 40\nfx = 50.0\nfy = 52.0"), "camera", "either fov_degrees or"),
    (("eye = [0.0, -0.5, 0.6]", "eye = [0.0, 0.0, 0.0]"), "camera.at", "must differ from eye"),
    (("ambient = 0.3", "ambient = -0.3"), "light.ambient", ">= 0"),
    (
        ("light_direction_degrees = 25", "light_direction_degrees = 100"),
        "randomize.light_direction_degrees",
        "<= 90",
    ),  # fmt: skip
    (("brightness = 0.2", "brightness = true"), "randomize.brightness", "must be a number"),
    (("color = [0.5, 0.4, 0.3]", "color = [0.5, 0.4, 1.3]"), "table.color[2]", "<= 1"),
    (("size = [0.5, 0.4]", "size = [0.5, 0]"), "table.size[1]", "> 0"),
    (('mesh = "block.stl"', 'mesh = "missing.obj"'), "objects[0].mesh", "no such file 'missing.obj'"),
    (('mesh = "block.stl"', 'mesh = "block.stl"\nprimitive = "cube"'), "objects[0]", "exactly one of"),
    (('primitive = "sphere"', 'primitive = "torus"'), "objects[1].primitive", "must be one of"),
    (("radius = 0.04", "radius = 0.04\nextents = [1, 1, 1]"), "objects[1]", "unknown key 'extents'"),
    (('name = "ball"', 'name = "block"'), "objects[1].name", "must be unique"),
    (("scale = 0.001", "scale = 1"), "objects[0]", "does not fit on the 0.5 x 0.4 m table"),  # metres taken as mm
    (('name = "ball"', 'name = "ball"\nyaw_symmetry = 7'), "objects[1].yaw_symmetry", "divide 360"),
    (('name = "ball"', 'name = "ball"\nyaw_symmetry = "some"'), "objects[1].yaw_symmetry", '"auto", "none"'),
]


@pytest.mark.parametrize(("edit", "key", "words"), BAD_KEYS, ids=[k or w for _, k, w in BAD_KEYS])
def test_each_bad_key_is_an_error_naming_the_file_and_the_key(tmp_path, edit, key, words):
    old, new = edit
    assert old in SMALL_WORLD
    path = write_world(tmp_path, SMALL_WORLD.replace(old, new, 1), "bad.toml")
    with pytest.raises(WorldError) as err:
        load_world(path)
    message = str(err.value)
    assert message.startswith(f"bad.toml: {key}" if key else "bad.toml: "), message
    assert words in message, message
    assert isinstance(err.value, ValueError)


def test_malformed_toml_unreadable_mesh_and_unknown_names(tmp_path):
    with pytest.raises(WorldError, match=r"bad\.toml: not valid TOML"):
        load_world(write_world(tmp_path, SMALL_WORLD + "\n[[objects]\n", "bad.toml"))
    (tmp_path / "block.stl").write_bytes(b"solid nothing\nthis is not an stl\n")
    path = tmp_path / "bad2.toml"
    path.write_text(SMALL_WORLD)
    with pytest.raises(WorldError, match=r"bad2\.toml: objects\[0\]\.mesh: 'block\.stl': "):
        load_world(path)
    (tmp_path / "run.py").write_text("print('no')")
    path.write_text(SMALL_WORLD.replace('mesh = "block.stl"', 'mesh = "run.py"'))
    with pytest.raises(WorldError, match=r"objects\[0\]\.mesh: 'run\.py': unsupported mesh format"):
        load_world(path)
    with pytest.raises(WorldError, match="built-in worlds: primitives, kitchen"):
        load_world("no-such-world")


# ---- meshes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["obj", "stl", "ply", "glb"])
def test_mesh_formats_units_and_axes(tmp_path, fmt):
    """A 0.2 x 0.1 x 0.05 box offset from the origin, written in centimetres by trimesh: read back in metres,
    resting on z = 0, its x-y offset kept (the pose origin is the file's origin)."""
    box = trimesh.creation.box(extents=(20.0, 10.0, 5.0))
    box.apply_translation((3.0, 1.0, 7.0))
    up = "z"
    if fmt == "glb":  # glTF files are +y up: write it so and say so
        box.apply_transform(trimesh.transformations.rotation_matrix(-math.pi / 2, (1, 0, 0)))
        up = "y"
    box.export(tmp_path / f"box.{fmt}")
    raw = world_meshes.read_mesh_file(tmp_path / f"box.{fmt}")
    mesh = world_meshes.prepare_mesh(raw, scale=0.01, up_axis=up)
    assert_close(np.array(mesh.extents), [0.2, 0.1, 0.05], atol=1e-9)
    assert_close(np.array(mesh.bounds[0]), [0.03 - 0.1, 0.01 - 0.05, 0.0], atol=1e-9)
    assert mesh.is_watertight


def test_an_obj_material_library_is_not_opened(tmp_path):
    """Mesh files are parsed from memory without a resolver: an OBJ naming a material library (here one that does
    not exist, outside the directory) still loads, and nothing is looked up."""
    (tmp_path / "tri.obj").write_text("mtllib ../../elsewhere/secret.mtl\nusemtl x\nv 0 0 0\nv 1 0 0\nv 0 1 0\n"
                                      "v 0 0 1\nf 1 3 2\nf 1 2 4\nf 2 3 4\nf 1 4 3\n")  # fmt: skip
    mesh = world_meshes.read_mesh_file(tmp_path / "tri.obj")
    assert len(mesh.faces) == 4


def test_a_multi_part_glb_is_one_mesh_with_node_transforms(tmp_path):
    scene = trimesh.Scene()
    moved = trimesh.transformations.translation_matrix((2, 0, 0))
    scene.add_geometry(trimesh.creation.box(extents=(1, 1, 1)), transform=moved)
    scene.add_geometry(trimesh.creation.box(extents=(1, 1, 1)))
    scene.export(tmp_path / "two.glb")
    mesh = world_meshes.read_mesh_file(tmp_path / "two.glb")
    assert len(mesh.faces) == 24
    assert_close(np.array(mesh.bounds), [[-0.5, -0.5, -0.5], [2.5, 0.5, 0.5]], atol=1e-6)


def _mug() -> trimesh.Trimesh:
    cup = trimesh.creation.cylinder(radius=0.04, height=0.09, sections=32)
    handle = trimesh.creation.box(extents=(0.03, 0.01, 0.05))
    handle.apply_translation((0.05, 0.0, 0.0))
    return trimesh.util.concatenate([cup, handle])


SYMMETRIES = {  # mesh -> expected smallest symmetric turn in degrees (0 any, 360 none)
    "cube": (lambda: world_meshes.primitive_mesh("cube", size=0.1), 90),
    "box": (lambda: world_meshes.primitive_mesh("box", extents=(0.16, 0.07, 0.07)), 180),
    "hexagonal prism": (lambda: trimesh.creation.cylinder(radius=0.05, height=0.08, sections=6), 60),
    "cylinder": (lambda: world_meshes.primitive_mesh("cylinder", radius=0.05, height=0.1), 0),
    "cylinder, 16 sides": (lambda: trimesh.creation.cylinder(radius=0.05, height=0.1, sections=16), 0),
    "cylinder, subdivided": (lambda: trimesh.creation.cylinder(radius=0.05, height=0.1, sections=64).subdivide(), 0),
    "cube, subdivided": (lambda: world_meshes.primitive_mesh("cube", size=0.1).subdivide().subdivide(), 90),
    "sphere": (lambda: world_meshes.primitive_mesh("sphere", radius=0.05), 0),
    "wedge": (lambda: world_meshes.primitive_mesh("wedge", length=0.14, width=0.1, height=0.1), 360),
    "mug with a handle": (_mug, 360),
    "cube, origin off its centre": (
        lambda: world_meshes.primitive_mesh("cube", size=0.1).apply_translation((0.03, 0.01, 0.0)),
        360,
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(SYMMETRIES))
def test_yaw_symmetry_detection(name):
    make, degrees = SYMMETRIES[name]
    assert math.degrees(world_meshes.detect_yaw_period(make())) == pytest.approx(degrees)


def test_recenter_restores_the_symmetry_of_an_off_centre_mesh(tmp_path):
    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    cube.apply_translation((0.3, 0.2, 0.0))
    mesh = world_meshes.prepare_mesh(cube, scale=0.1, recenter=True)
    assert_close(np.array(mesh.bounds[:, :2].mean(0)), [0.0, 0.0], atol=1e-12)
    assert math.degrees(world_meshes.detect_yaw_period(mesh)) == pytest.approx(90)


def test_footprint_of_a_non_convex_mesh_is_its_convex_hull_from_above():
    a = trimesh.creation.box(extents=(0.1, 0.02, 0.02))
    b = trimesh.creation.box(extents=(0.02, 0.1, 0.02))
    a.apply_translation((0.04, 0.0, 0.01))
    b.apply_translation((0.0, 0.04, 0.01))
    hull = world_meshes.footprint_hull(trimesh.util.concatenate([a, b]))  # an L seen from above
    expected = {(-0.01, -0.01), (0.09, -0.01), (0.09, 0.01), (0.01, 0.09), (-0.01, 0.09)}
    assert {(round(x, 6), round(y, 6)) for x, y in hull} == expected


# ---- sampler -----------------------------------------------------------------------------------------------
def test_sampler_respects_counts_the_table_and_overlap(small):
    scenes = small.sample_scenes(200, seed=3)
    counts = [len(s["objects"]) for s in scenes]
    assert set(counts) == {1, 2, 3}
    shapes = {o["shape"] for s in scenes for o in s["objects"]}
    assert shapes == {"block", "ball"}
    for s in scenes:
        small.validate_scene(s)  # on the table, no overlap
        for o in s["objects"]:
            polygon = small.object_named(o["shape"]).footprint_at(o["position"], o["yaw"])
            assert np.abs(polygon[:, 0]).max() <= 0.25 - small.min_gap + 1e-12
            assert np.abs(polygon[:, 1]).max() <= 0.20 - small.min_gap + 1e-12
    assert small.sample_scenes(200, seed=3) == scenes and small.sample_scenes(200, seed=4) != scenes
    ys = [o["position"][1] for s in scenes for o in s["objects"]]
    assert max(ys) < 0.2 and min(ys) > -0.2 and max(ys) - min(ys) > 0.25  # uses the rectangular table's depth


def test_validate_scene_rejects_unknown_shapes_off_table_and_overlap(small):
    with pytest.raises(ValueError, match="unknown shape 'cube'"):
        small.validate_scene({"objects": [{"shape": "cube", "position": [0, 0], "yaw": 0}]})
    with pytest.raises(ValueError, match="off the"):
        small.validate_scene({"objects": [{"shape": "ball", "position": [0.24, 0], "yaw": 0}]})
    two = {"objects": [{"shape": "ball", "position": [0, 0], "yaw": 0}, {"shape": "ball", "position": [0.05, 0],
                                                                        "yaw": 0}]}  # fmt: skip
    with pytest.raises(ValueError, match="interpenetrate"):
        small.validate_scene(two)


def test_the_primitives_world_is_todays_sampler_and_renderer_exactly():
    w = load_world("primitives")
    assert w.shape_names == tabletop.SHAPES and w.image_size == (64, 64) and w.objects_per_scene == (0, 3)
    assert w.camera.renderer_camera() == tabletop.CAMERA and w.light.direction == tabletop.LIGHT.direction
    assert w.table.size == (2 * tabletop.TABLE_HALF_SIZE,) * 2
    scenes = w.sample_scenes(12, seed=5)
    assert scenes == [s.to_dict() for s in tabletop.sample_scenes(12, seed=5)]
    assert torch.equal(w.render_scenes(scenes), tabletop.render_scenes(scenes))
    for o in w.objects:
        assert o.yaw_period == pytest.approx(world_meshes.detect_yaw_period(o.mesh))  # explicit = detected


@pytest.mark.parametrize("count", [20, 30])
def test_a_count_that_cannot_fit_is_a_load_time_error(tmp_path, count):
    """20 balls (the largest footprint, 0.08 m across) would cover half the table: random placement jams, the
    sampler's own attempt fails; 30 would cover 74%, refused without trying."""
    text = SMALL_WORLD.replace("objects_per_scene = [1, 3]", f"objects_per_scene = [0, {count}]")
    words = "could not be placed" if count == 20 else "would cover"
    with pytest.raises(WorldError, match=rf"crowded.toml: objects_per_scene: {count} objects may not fit .* "
                                         rf"{count} x 'ball' .*{words}"):  # fmt: skip
        load_world(write_world(tmp_path, text, "crowded.toml"))


# ---- randomisation and rendering ---------------------------------------------------------------------------
def test_randomised_appearance_stays_inside_its_ranges_and_is_reproducible(small):
    r = small.randomize
    assert r is not None
    ids = torch.tensor([[0, 1, -1]] * 400)
    a = small.sample_appearance(ids, randomize=True, seed=7)
    assert (a.gain >= 1 - r.brightness).all() and (a.gain <= 1 + r.brightness).all() and a.gain.std() > 0.05
    nominal_light = torch.tensor(small.light.direction) / torch.tensor(small.light.direction).norm()
    angles = torch.rad2deg(torch.acos((a.light_direction @ nominal_light).clamp(-1, 1)))
    assert angles.max() <= r.light_direction_degrees + 1e-3 and angles.max() > 0.8 * r.light_direction_degrees
    assert_close(a.light_direction.norm(dim=1), torch.ones(400), atol=1e-6)
    assert (a.ambient - small.light.ambient).abs().max() <= r.ambient + 1e-6
    base = small.colors[ids.clamp(min=0)]
    assert (a.object_colors - base).abs().max() <= r.object_color + 1e-6 and (a.object_colors - base).std() > 0.03
    assert (a.object_colors[:, 0] != a.object_colors[:, 1]).any()  # per object, not per image
    assert (a.table_color - torch.tensor(small.table.color)).abs().max() <= r.table_color + 1e-6
    shift = (a.eye - torch.tensor(small.camera.eye)).norm(dim=1)
    assert shift.max() <= r.camera_position + 1e-6 and shift.max() > 0.8 * r.camera_position
    assert a.noise_sd == r.pixel_noise
    b = small.sample_appearance(ids, randomize=True, seed=7)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("gain", "light_direction", "eye"))
    off = small.sample_appearance(ids, randomize=False, seed=7)
    assert (off.gain == 1).all() and (off.eye == torch.tensor(small.camera.eye)).all() and off.noise_sd == 0


def test_render_scenes_non_square_intrinsics_nominal_and_randomised(small):
    scenes = small.sample_scenes(3, seed=1)
    nominal = small.render_scenes(scenes)
    assert nominal.shape == (3, 3, 32, 48) and nominal.dtype == torch.float32
    assert torch.equal(small.render_scenes(scenes, randomize=False, seed=9), nominal)  # seed unused when off
    a = small.render_scenes(scenes, randomize=True, seed=2)
    assert torch.equal(a, small.render_scenes(scenes, randomize=True, seed=2))
    assert not torch.equal(a, small.render_scenes(scenes, randomize=True, seed=3))
    assert 0.005 < (a - nominal).abs().mean() < 0.3 and a.min() >= 0 and a.max() <= 1
    # the camera is the world's: its renderer gets the intrinsics as given
    camera = small.stage.camera
    assert isinstance(camera, Camera) and camera.pixel_intrinsics(48, 32) == (50.0, 52.0, 23.0, 17.0)


def test_a_ball_appears_where_the_intrinsics_project_it(small):
    """The ball's centre (0, 0, r) projects through (fx, fy, cx, cy) onto the centroid of its mask."""
    t = small.scenes_to_tensors([{"objects": [{"shape": "ball", "position": [0.0, 0.0], "yaw": 0.0}]}])
    out = small.make_renderer("hard", "pytorch3d")(t.shape_ids, t.positions, t.yaws)
    mask = out.object_mask[0].float()
    rows, cols = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(48) + 0.5, indexing="ij")
    centroid = ((mask * cols).sum() / mask.sum(), (mask * rows).sum() / mask.sum())
    eye, centre = np.array(small.camera.eye), np.array([0.0, 0.0, 0.04])
    z = -eye / np.linalg.norm(eye)  # optical axis towards at = origin
    x = np.cross(z, [0, 0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    d = centre - eye
    u, v = 23.0 + 50.0 * (d @ x) / (d @ z), 17.0 + 52.0 * (d @ y) / (d @ z)
    assert abs(float(centroid[0]) - u) < 0.5 and abs(float(centroid[1]) - v) < 0.5


def test_make_renderer_at_another_size_rescales_intrinsics(small):
    renderer = small.make_renderer("hard", "pytorch3d", image_size=(96, 64))
    assert renderer.stage.camera.pixel_intrinsics(96, 64) == (100.0, 104.0, 46.0, 34.0)
    t = small.scenes_to_tensors(small.sample_scenes(1, seed=0))
    assert renderer(t.shape_ids, t.positions, t.yaws).images.shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match="backend"):
        small.make_renderer(backend="vulkan")


# ---- serialisation and built-in worlds ---------------------------------------------------------------------
def test_to_dict_is_plain_json_and_round_trips_exactly(small):
    d = small.to_dict()
    text = json.dumps(d, allow_nan=False)  # plain JSON types only
    back = World.from_dict(json.loads(text))
    assert back.to_dict() == d
    for a, b in zip(small.objects, back.objects, strict=True):
        assert np.array_equal(a.mesh.vertices, b.mesh.vertices) and np.array_equal(a.mesh.faces, b.mesh.faces)
        assert a.yaw_period == b.yaw_period
    scenes = small.sample_scenes(2, seed=0)
    assert torch.equal(back.render_scenes(scenes, randomize=True, seed=1), small.render_scenes(scenes, True, 1))


def test_same_scenes_ignores_only_the_randomisation_ranges(small):
    """A model trained under random appearances is scored on its world without them; any other difference (here
    the table's colour, the light) is another world."""
    d = small.to_dict()
    bare = World.from_dict({k: v for k, v in d.items() if k != "randomize"})
    assert bare.randomize is None and small.same_scenes(bare) and bare.same_scenes(small)
    assert not small.same_scenes(World.from_dict({**d, "table": {**d["table"], "color": [0.5, 0.5, 0.5]}}))
    dimmer = {**d["light"], "ambient": d["light"]["ambient"] + 0.05}
    assert not small.same_scenes(World.from_dict({**d, "light": dimmer}))


def test_from_dict_validates(small):
    d = small.to_dict()
    with pytest.raises(WorldError, match="format"):
        World.from_dict({**d, "format": "something-else"})
    broken = json.loads(json.dumps(d))
    broken["objects"][0]["faces"][0] = [0, 1, 10**6]
    with pytest.raises(WorldError, match=r"world dict: objects\[0\]\.faces"):
        World.from_dict(broken)


def test_the_kitchen_world():
    w = load_world("kitchen")
    assert w.name == "kitchen" and w.image_size[0] >= 128 and w.image_size[1] >= 96
    assert w.objects_per_scene == (0, 6) and w.randomize is not None and w.camera.pixel is not None
    assert {"mug", "bowl", "can", "bottle", "cracker_box", "spatula"} <= set(w.shape_names)
    periods = {o.name: math.degrees(o.yaw_period) for o in w.objects}
    assert periods["mug"] == 360 and periods["can"] == 0 and periods["cracker_box"] == pytest.approx(180)
    for o in w.objects:
        assert 0.03 < max(o.mesh.extents) < 0.3, o.name  # household sizes in metres
        assert o.mesh.bounds[0, 2] == pytest.approx(0.0, abs=1e-12)
    heights = {o.name: float(o.mesh.extents[2]) for o in w.objects}
    assert heights["bottle"] == pytest.approx(0.23) and heights["can"] == pytest.approx(0.122)  # GLB y-up, STL mm
    colors = {o.color for o in w.objects}
    assert len(colors) == len(w.objects)  # one colour each
    files = [p for p in (Path(__file__).parents[1] / "scenes" / "worlds" / "kitchen").iterdir() if p.suffix != ".md"]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    assert {p.suffix for p in files} >= {".obj", ".ply", ".stl", ".glb"}
    scenes = w.sample_scenes(4, seed=0)
    assert w.render_scenes(scenes, randomize=True, seed=0).shape == (4, 3, w.image_size[1], w.image_size[0])


def test_the_example_in_the_docs_loads(tmp_path):
    """docs/tabletop.md's example world file, with a millimetre mug at the path it names."""
    doc = (Path(__file__).parents[1] / "docs" / "tabletop.md").read_text()
    example = doc.split("### Example")[1].split("```toml")[1].split("```")[0]
    (tmp_path / "meshes").mkdir()
    trimesh.creation.cylinder(radius=40.0, height=95.0, sections=24).export(tmp_path / "meshes" / "mug.obj")
    (tmp_path / "my_kitchen.toml").write_text(example)
    w = load_world(tmp_path / "my_kitchen.toml")
    assert w.image_size == (160, 120) and w.camera.intrinsics() == (175.0, 175.0, 80.0, 60.0)
    assert_close(np.array(w.objects[0].mesh.extents), [0.08, 0.08, 0.095], atol=1e-9)
    assert w.render_scenes(w.sample_scenes(1, seed=0), randomize=True, seed=0).shape == (1, 3, 120, 160)


def test_opengl_backend_renders_the_world_as_pytorch3d_does(small):
    """Randomised (appearance per scene), non-square, intrinsics: the two backends agree but for edge pixels."""
    from renderers.opengl import OpenGLUnavailableError

    scenes = small.sample_scenes(4, seed=6)
    try:
        gl = small.render_scenes(scenes, randomize=True, seed=1, backend="opengl")
    except OpenGLUnavailableError as err:
        pytest.skip(f"OpenGL renderer unavailable: {err}")
    reference = small.render_scenes(scenes, randomize=True, seed=1, backend="pytorch3d")
    differs = (gl - reference).abs().amax(1) > 0.1  # (B, H, W)
    assert differs.float().mean() < 0.01 and (gl - reference).abs().mean() < 0.005


def test_gain_and_pixel_noise_act_on_the_rendered_image_as_specified(small):
    """Only brightness on: each image is the nominal one times a gain in [0.8, 1.2]; only pixel noise on: the
    residual's standard deviation is the given one (pixels clear of 0 and 1, where clipping cuts it)."""
    scenes = small.sample_scenes(6, seed=8)
    nominal = small.render_scenes(scenes)
    d = small.to_dict()
    zeros = dict.fromkeys(d["randomize"], 0.0)
    bright = World.from_dict({**d, "randomize": {**zeros, "brightness": 0.2}})
    images = bright.render_scenes(scenes, randomize=True, seed=0)
    lit = (nominal > 0.05) & (nominal < 0.8)  # clear of float32 rounding and of clipping at 1
    ratios = [(images[b][lit[b]] / nominal[b][lit[b]]) for b in range(6)]
    for r in ratios:
        assert r.std() < 1e-4 and 0.8 - 1e-6 <= r.mean() <= 1.2 + 1e-6
    assert max(float(r.mean()) for r in ratios) - min(float(r.mean()) for r in ratios) > 0.05
    noisy = World.from_dict({**d, "randomize": {**zeros, "pixel_noise": 0.05}})
    residual = noisy.render_scenes(scenes, randomize=True, seed=0) - nominal
    inside = (nominal > 0.2) & (nominal < 0.8)
    assert abs(float(residual[inside].std()) - 0.05) < 0.003 and abs(float(residual[inside].mean())) < 0.003


def test_the_soft_renderer_of_a_world_is_differentiable_in_poses_and_close_to_hard(small):
    t = small.scenes_to_tensors(small.sample_scenes(2, seed=11))
    colors = small.colors[t.shape_ids.clamp(min=0)]
    hard = small.make_renderer("hard", "pytorch3d")(t.shape_ids, t.positions, t.yaws, colors).images
    positions = t.positions.clone().requires_grad_(True)
    soft = small.make_renderer("soft", "pytorch3d")(t.shape_ids, positions, t.yaws, colors).images
    assert soft.shape == hard.shape == (2, 3, 32, 48) and (soft - hard).abs().mean() < 0.02
    soft.sum().backward()
    assert positions.grad is not None and torch.isfinite(positions.grad).all()
    assert (positions.grad[t.shape_ids >= 0].abs().sum(-1) > 0).all()
    with pytest.raises(ValueError, match="OpenGL backend renders hard images only"):
        small.make_renderer("soft", "opengl")
