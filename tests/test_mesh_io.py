"""load_mesh: the shared CC0 assets, unit-box normalisation, scene flattening with a texture atlas, bad files."""


import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from shared_assets import SHARED_ASSETS
from trimesh.visual import ColorVisuals, TextureVisuals
from trimesh.visual.material import PBRMaterial

from microdreamer.errors import UserError
from microdreamer.io.mesh import TexturedMesh, load_mesh
from microdreamer.render.mesh import sample_texture

ASSETS = SHARED_ASSETS
# (file, faces, texture side) as the files define them
SHARED = [
    ("spot/spot.obj", 5856, 1024),
    ("bob/bob_tri.obj", 10688, 2048),
    ("avocado/avocado.gltf", 682, 2048),
    ("fox/Fox.glb", 576, 1024),
]


@pytest.mark.parametrize("name,faces,side", SHARED)
def test_shared_assets_load_textured_in_the_unit_box(name, faces, side):
    path = ASSETS / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    mesh = load_mesh(path)
    assert mesh.faces.shape == (faces, 3) and mesh.faces.dtype == torch.int64
    v = mesh.vertices
    assert v.dtype == torch.float32 and v.shape[1] == 3 and len(v) >= faces / 2
    assert int(mesh.faces.min()) == 0 and int(mesh.faces.max()) == len(v) - 1
    lo, hi = v.amin(0), v.amax(0)
    assert torch.allclose((lo + hi) / 2, torch.zeros(3), atol=1e-6)
    assert float((hi - lo).max()) == pytest.approx(1.0, abs=1e-6)
    assert mesh.uvs.shape == (len(v), 2)
    assert mesh.texture.shape == (side, side, 3)
    assert 0 <= float(mesh.texture.min()) and float(mesh.texture.max()) <= 1
    assert float(mesh.texture.std()) > 0.05  # a real picture, not a flat colour
    assert torch.equal(mesh.base_color, torch.ones(3))


def test_normalize_false_keeps_file_units_and_node_transforms():
    path = ASSETS / "avocado/avocado.gltf"
    if not path.exists():
        pytest.skip("avocado not available")
    raw = load_mesh(path, normalize=False)
    scene = trimesh.load(str(path), force="scene")
    (node,) = scene.graph.nodes_geometry
    transform, name = scene.graph[node]
    expected = trimesh.transform_points(scene.geometry[name].vertices, transform)
    assert not np.allclose(transform, np.eye(4))  # the file does carry a node transform
    np.testing.assert_allclose(raw.vertices.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_yaw_turns_about_y():
    path = ASSETS / "spot/spot.obj"
    if not path.exists():
        pytest.skip("spot not available")
    base, turned = load_mesh(path), load_mesh(path, yaw=90)
    x, y, z = base.vertices.unbind(-1)
    # R_y(90°): (x, y, z) → (z, y, −x); a quarter turn maps the bounding box onto itself
    assert torch.allclose(turned.vertices, torch.stack([z, y, -x], -1), atol=1e-6)


def _quad() -> trimesh.Trimesh:
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], float)
    return trimesh.Trimesh(v, [[0, 1, 2], [0, 2, 3]], process=False)


def test_scene_parts_share_an_atlas_and_keep_their_colours(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4], image[:, 4:] = (255, 0, 0), (0, 255, 0)  # left red, right green
    textured = _quad()
    uv = np.array([[0.25, 0.5], [0.75, 0.5], [0.75, 0.5], [0.25, 0.5]])
    textured.visual = TextureVisuals(uv=uv, material=PBRMaterial(baseColorTexture=Image.fromarray(image)))
    flat = _quad()
    flat.visual = TextureVisuals(material=PBRMaterial(baseColorFactor=[0, 0, 255, 255]))
    painted = _quad()
    painted.visual = ColorVisuals(painted, vertex_colors=np.tile([255, 255, 0, 255], (4, 1)).astype(np.uint8))
    scene = trimesh.Scene()
    scene.add_geometry(textured, node_name="t", geom_name="t")
    shift = trimesh.transformations.translation_matrix
    scene.add_geometry(flat, node_name="f", geom_name="f", transform=shift([2, 0, 0]))
    scene.add_geometry(painted, node_name="p", geom_name="p", transform=shift([0, 2, 0]))
    path = tmp_path / "parts.glb"
    scene.export(str(path))

    mesh = load_mesh(path, normalize=False)
    assert mesh.faces.shape == (6, 3) and mesh.vertices.shape == (12, 3)
    colour = sample_texture(mesh.texture, mesh.uvs) * mesh.vertex_colors
    by_offset = {}
    for tri in mesh.faces:
        where = tuple(mesh.vertices[tri].amin(0).round().int().tolist())
        by_offset.setdefault(where, set()).update(tuple(c) for c in colour[tri].round().int().tolist())
    assert by_offset[(0, 0, 0)] == {(1, 0, 0), (0, 1, 0)}  # red and green halves of the texture
    assert by_offset[(2, 0, 0)] == {(0, 0, 1)}  # baseColorFactor baked into its atlas tile
    assert by_offset[(0, 2, 0)] == {(1, 1, 0)}  # vertex colours kept


def test_vertex_coloured_mesh_without_texture(tmp_path):
    quad = _quad()
    rgba = np.array([[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255], [255, 255, 255, 255]], np.uint8)
    quad.visual = ColorVisuals(quad, vertex_colors=rgba)
    path = tmp_path / "painted.ply"
    quad.export(str(path))
    mesh = load_mesh(path)
    assert mesh.texture is None and mesh.uvs is None
    order = torch.argsort(mesh.vertices[:, 0] * 2 + mesh.vertices[:, 1])  # (0,0), (0,1), (1,0), (1,1)
    expected = torch.tensor([[1.0, 0, 0], [1, 1, 1], [0, 1, 0], [0, 0, 1]])
    assert torch.allclose(mesh.vertex_colors[order], expected)


def test_to_moves_every_tensor():
    mesh = TexturedMesh(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), uvs=torch.zeros(3, 2),
                        texture=torch.zeros(2, 2, 3))
    moved = mesh.to("meta")
    tensors = (moved.vertices, moved.faces, moved.uvs, moved.texture, moved.base_color)
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.vertex_colors is None


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("missing.obj", None, "not found"),
        ("notes.obj", b"this is not a mesh\njust some words\n", "no triangles"),
        ("empty.obj", b"", "empty"),
        ("empty.glb", b"", "empty"),
        ("garbage.glb", b"glTF\x02\x00\x00\x00garbage", "not a valid .glb file"),
    ],
)
def test_bad_files_raise_one_line_user_errors(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_mesh(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and needle in message


def test_directory_is_rejected(tmp_path):
    with pytest.raises(UserError, match="not a file"):
        load_mesh(tmp_path)


def test_face_colours_become_per_face_vertex_colours(tmp_path):
    quad = _quad()
    quad.visual = ColorVisuals(quad, face_colors=np.array([[255, 0, 0, 255], [0, 0, 255, 255]], np.uint8))
    path = tmp_path / "faces.ply"
    quad.export(str(path))
    mesh = load_mesh(path)
    assert mesh.vertices.shape == (6, 3)  # unshared corners keep the colours flat
    corner = mesh.vertex_colors[mesh.faces]  # [F,3,3]
    assert torch.equal(corner[0], torch.tensor([[1.0, 0, 0]] * 3))
    assert torch.equal(corner[1], torch.tensor([[0.0, 0, 1]] * 3))
