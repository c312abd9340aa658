"""Mesh writers: GLB / OBJ+MTL+PNG / PLY round trips through trimesh and our loader, frame and scale."""

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from microdreamer.export.uv import unwrap
from microdreamer.export.writers import output_frame, output_paths, write_mesh
from microdreamer.io.mesh import load_mesh


@pytest.fixture(scope="module")
def asset_parts():
    """An off-centre, non-cubic ellipsoid with an atlas and a texture that varies across it."""
    sphere = trimesh.creation.icosphere(subdivisions=3)
    vertices = sphere.vertices * [0.4, 0.2, 0.1] + [1.0, 2.0, -0.5]
    mesh = unwrap(vertices, np.asarray(sphere.faces, np.int64), 64, padding=2)
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    texture = torch.stack([rows, cols, 1 - rows * cols], -1)
    return mesh, texture


def test_frame_centres_the_box_and_scales_its_longest_side(asset_parts):
    mesh, texture = asset_parts
    asset = output_frame(mesh, texture, "y", 2.5)
    lo, hi = asset.vertices.min(0), asset.vertices.max(0)
    assert np.allclose((lo + hi) / 2, 0, atol=1e-9)
    assert np.allclose(hi - lo, np.array([0.8, 0.4, 0.2]) * 2.5 / 0.8, atol=1e-3)
    up = output_frame(mesh, texture, "z", 1.0)
    assert np.allclose(up.vertices.max(0) - up.vertices.min(0), [1.0, 0.25, 0.5], atol=1e-3)  # height on z
    top = np.argmax(mesh.vertices[:, 1])
    assert np.argmax(up.vertices[:, 2]) == top  # what was up (+y) is up (+z)
    assert np.allclose(np.linalg.norm(asset.normals, axis=1), 1)
    assert asset.texture.dtype == np.uint8 and asset.texture.shape == (64, 64, 3)
    for frame, written in ((asset.frame, asset.vertices), (up.frame, up.vertices)):
        assert np.allclose(frame.to_world(written), mesh.vertices)  # the export's frame undoes itself


def test_glb_round_trip_keeps_geometry_uvs_and_an_embedded_texture(tmp_path, asset_parts):
    mesh, texture = asset_parts
    asset = output_frame(mesh, texture, "y", 1.0)
    (path,) = write_mesh(asset, tmp_path, "thing", "glb")
    assert path == tmp_path / "thing.glb" and sorted(p.name for p in tmp_path.iterdir()) == ["thing.glb"]
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.faces) == len(mesh.uv_faces)
    image = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))
    assert image.shape == (64, 64, 3) and image.std() > 10  # a real, non-empty texture
    assert np.array_equal(image, asset.texture)
    uv = np.asarray(loaded.visual.uv)
    assert uv.min() >= 0 and uv.max() <= 1
    assert np.allclose(uv, asset.uvs, atol=1e-6)  # trimesh flips glTF's v back to OBJ convention
    assert np.allclose(loaded.vertices, asset.vertices[asset.source], atol=1e-6)
    ours = load_mesh(path, normalize=False)
    assert ours.has_texture and torch.allclose(ours.texture, torch.from_numpy(asset.texture / 255.0).float())


def test_obj_writes_mtl_and_png_beside_it_and_loads_welded(tmp_path, asset_parts):
    mesh, texture = asset_parts
    asset = output_frame(mesh, texture, "y", 1.0)
    paths = write_mesh(asset, tmp_path, "thing", "obj")
    assert [p.name for p in paths] == ["thing.obj", "thing.mtl", "thing_albedo.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert "map_Kd thing_albedo.png" in paths[1].read_text()
    assert np.array_equal(np.asarray(Image.open(paths[2])), asset.texture)
    text = paths[0].read_text()
    assert text.count("\nv ") == len(mesh.vertices)  # one position per vertex: the surface stays welded
    assert text.count("\nvt ") == len(mesh.uvs)
    loaded = trimesh.load(paths[0], force="mesh", process=False)
    assert len(loaded.faces) == len(mesh.uv_faces)
    assert np.asarray(loaded.visual.material.image).shape[:2] == (64, 64)
    assert loaded.visual.uv.min() >= 0 and loaded.visual.uv.max() <= 1
    ours = load_mesh(paths[0], normalize=False)
    assert ours.has_texture
    # same surface: every loaded corner sits on a written corner
    assert np.allclose(np.sort(ours.vertices.numpy()[ours.faces.numpy()].reshape(-1, 3), axis=0),
                       np.sort(asset.vertices[asset.faces].reshape(-1, 3), axis=0), atol=1e-5)


def test_ply_has_welded_vertices_with_the_texture_colours(tmp_path, asset_parts):
    mesh, texture = asset_parts
    asset = output_frame(mesh, texture, "z", 1.0)
    (path,) = write_mesh(asset, tmp_path, "thing", "ply")
    assert path.name == "thing_mesh.ply"
    loaded = trimesh.load(path, process=False)
    assert len(loaded.vertices) == len(mesh.vertices) and len(loaded.faces) == len(mesh.uv_faces)
    colors = np.asarray(loaded.visual.vertex_colors)[:, :3]
    assert np.array_equal(colors, asset.vertex_colors())
    assert colors.std() > 10
    # a vertex with one UV copy has the texture's colour at that UV
    copies = np.bincount(asset.source, minlength=len(asset.vertices))
    k = np.nonzero(copies[asset.source] == 1)[0]
    u, v = asset.uvs[k].T
    expected = texture.numpy()[np.clip(np.round((1 - v) * 64 - 0.5).astype(int), 0, 63),
                               np.clip(np.round(u * 64 - 0.5).astype(int), 0, 63)] * 255
    assert np.abs(colors[asset.source[k]].astype(float) - expected).mean() < 4  # bilinear vs nearest texel


def test_output_names_and_bad_format(tmp_path):
    assert [p.name for p in output_paths(tmp_path, "a", "obj")] == ["a.obj", "a.mtl", "a_albedo.png"]
    from microdreamer.errors import UserError

    with pytest.raises(UserError):
        output_paths(tmp_path, "a", "fbx")
