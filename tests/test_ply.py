"""3DGS PLY files: lossless round trip, foreign headers, and clear rejections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from microdreamer.errors import UserError
from microdreamer.io.ply import GaussianPLY, read_gaussian_ply, write_gaussian_ply


def _random_ply(n: int, sh_degree: int, seed: int = 0) -> GaussianPLY:
    g = torch.Generator().manual_seed(seed)
    k = (sh_degree + 1) ** 2 - 1
    return GaussianPLY(
        means=torch.randn(n, 3, generator=g),
        f_dc=torch.randn(n, 3, generator=g),
        f_rest=torch.randn(n, k, 3, generator=g),
        opacity=torch.randn(n, generator=g) * 3,
        scale=torch.randn(n, 3, generator=g) - 4,
        rotation=torch.randn(n, 4, generator=g),
    )


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


@pytest.mark.parametrize("sh_degree", [0, 1, 3])
def test_round_trip_is_bit_exact(tmp_path, sh_degree):
    src = _random_ply(257, sh_degree)
    src.opacity[0] = float("inf")  # extreme values survive too
    src.scale[1, 2] = -1e-38
    path = tmp_path / "model.ply"
    write_gaussian_ply(path, src)
    back = read_gaussian_ply(path)
    assert back.sh_degree == sh_degree and back.num_points == 257
    for name in ("means", "f_dc", "f_rest", "opacity", "scale", "rotation"):
        a, b = getattr(src, name), getattr(back, name)
        assert a.shape == b.shape and b.dtype == torch.float32, name
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=name)
    assert [p.name for p in tmp_path.iterdir()] == ["model.ply"]  # no temporary left behind


def test_layout_matches_3dgs(tmp_path):
    """Header order and byte layout as 3DGS writes it; f_rest is channel-major."""
    src = _random_ply(3, 1)
    path = tmp_path / "m.ply"
    write_gaussian_ply(path, src)
    raw = path.read_bytes()
    header, body = raw.split(b"end_header\n", 1)
    lines = header.decode().splitlines()
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 3"]
    names = [line.split()[2] for line in lines[3:]]
    assert names == (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                     + [f"f_rest_{i}" for i in range(9)]
                     + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    table = np.frombuffer(body, dtype="<f4").reshape(3, len(names))
    # f_rest_{c*K+k} is coefficient k of channel c (K = 3 at degree 1)
    assert table[1, 9 + 2 * 3 + 1] == src.f_rest[1, 1, 2].item()
    assert table[2, names.index("opacity")] == src.opacity[2].item()
    assert table[0, names.index("rot_0")] == src.rotation[0, 0].item()
    np.testing.assert_array_equal(table[:, 3:6], 0.0)


def test_reads_foreign_header(tmp_path):
    """A plyfile-style file: comments, other property order, doubles, an extra element before and
    after the vertices, and extra vertex properties are all accepted."""
    n = 5
    rng = np.random.default_rng(1)
    props = ["rot_0", "rot_1", "rot_2", "rot_3", "x", "y", "z", "red", "opacity",
             "scale_0", "scale_1", "scale_2", "f_dc_0", "f_dc_1", "f_dc_2"]
    dtype = [(p, "<f8") if p != "red" else (p, "u1") for p in props]
    rec = np.zeros(n, dtype=dtype)
    for p in props:
        rec[p] = rng.integers(0, 255, n) if p == "red" else rng.normal(size=n)
    header = ("ply\r\nformat binary_little_endian 1.0\r\ncomment written by hand\r\n"
              "element camera 1\r\nproperty float fx\r\nproperty int w\r\n"
              f"element vertex {n}\r\n"
              + "".join(f"property {'uchar' if p == 'red' else 'double'} {p}\r\n" for p in props)
              + "element face 1\r\nproperty list uchar int vertex_indices\r\nend_header\r\n")
    camera = np.array([(500.0, 256)], dtype=[("fx", "<f4"), ("w", "<i4")]).tobytes()
    face = bytes([3]) + np.array([0, 1, 2], "<i4").tobytes()
    path = tmp_path / "foreign.ply"
    path.write_bytes(header.encode() + camera + rec.tobytes() + face)
    g = read_gaussian_ply(path)
    assert g.num_points == n and g.sh_degree == 0
    np.testing.assert_array_equal(g.means.numpy(), np.stack([rec["x"], rec["y"], rec["z"]], 1).astype("f4"))
    np.testing.assert_array_equal(g.rotation[:, 0].numpy(), rec["rot_0"].astype("f4"))
    np.testing.assert_array_equal(g.opacity.numpy(), rec["opacity"].astype("f4"))


def test_big_endian(tmp_path):
    src = _random_ply(4, 0)
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
             "rot_0", "rot_1", "rot_2", "rot_3"]
    table = torch.cat([src.means, src.f_dc, src.opacity[:, None], src.scale, src.rotation], 1).numpy()
    header = "ply\nformat binary_big_endian 1.0\nelement vertex 4\n" + "".join(
        f"property float {p}\n" for p in names) + "end_header\n"
    path = tmp_path / "be.ply"
    path.write_bytes(header.encode() + table.astype(">f4").tobytes())
    back = read_gaussian_ply(path)
    np.testing.assert_array_equal(_bits(back.scale), _bits(src.scale))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_gaussian_ply(tmp_path / "nope.ply")


def test_not_a_ply(tmp_path):
    path = tmp_path / "x.ply"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(UserError, match="not a PLY"):
        read_gaussian_ply(path)


def test_mesh_ply_rejected(tmp_path):
    path = tmp_path / "mesh.ply"
    trimesh.creation.icosphere(subdivisions=1).export(path)
    with pytest.raises(UserError, match="lacks the 3D Gaussian properties") as err:
        read_gaussian_ply(path)
    assert "\n" not in str(err.value)


def test_ascii_ply_rejected(tmp_path):
    path = tmp_path / "mesh.ply"
    trimesh.creation.box().export(path, encoding="ascii")
    with pytest.raises(UserError, match="binary only"):
        read_gaussian_ply(path)


def test_truncated_rejected(tmp_path):
    path = tmp_path / "t.ply"
    write_gaussian_ply(path, _random_ply(10, 0))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(UserError, match="truncated"):
        read_gaussian_ply(path)


def test_header_without_end_rejected(tmp_path):
    path = tmp_path / "h.ply"
    path.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\n")
    with pytest.raises(UserError, match="end_header"):
        read_gaussian_ply(path)


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "model.ply"
    write_gaussian_ply(path, _random_ply(3, 0))
    before = path.read_bytes()
    bad = _random_ply(3, 0)
    bad.rotation = torch.zeros(2, 4)  # wrong row count: the write fails before the rename
    with pytest.raises(RuntimeError):
        write_gaussian_ply(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.ply"]
