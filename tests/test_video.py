"""Turntable previews: cameras, chunked rendering, mp4/gif files that decode back, the render command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microdreamer import video
from microdreamer.cli import main
from microdreamer.config import GaussianConfig
from microdreamer.errors import UserError
from microdreamer.representations.gaussians import Gaussians
from microdreamer.sir.cameras import Cameras

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"
COLOURS = np.array([[255, 0, 0], [0, 200, 0], [0, 0, 255], [250, 250, 250], [40, 40, 40]], np.uint8)


def _solid_frames(height: int, width: int) -> np.ndarray:
    return np.broadcast_to(COLOURS[:, None, None, :], (len(COLOURS), height, width, 3)).copy()


def _no_stray_files(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep


def test_options_and_formats():
    assert video.VideoOptions().format == "mp4"
    with pytest.raises(UserError, match="unknown video format 'avi'"):
        video.VideoOptions(format="avi")
    with pytest.raises(UserError, match="frames"):
        video.VideoOptions(frames=0)
    assert video.format_of(Path("a/b.GIF")) == "gif" and video.format_of(Path("x.mp4")) == "mp4"
    with pytest.raises(UserError, match=".mp4 or .gif"):
        video.format_of(Path("x.mov"))


def test_turntable_cameras_start_at_the_given_azimuth_and_cover_360():
    cams = video.turntable_cameras(8, -15.0, 2.5, 64, 40.0, start_azimuth=90.0)
    assert torch.allclose(cams.azimuth, 90.0 + 45.0 * torch.arange(8.0))
    assert torch.all(cams.elevation == -15.0) and torch.all(cams.radius == 2.5)
    assert (cams.width, cams.height, cams.fovy) == (64, 64, 40.0)
    first = Cameras.orbit([-15.0], [90.0], 2.5, 64, 40.0)
    assert torch.allclose(cams.c2w[0], first.c2w[0], atol=1e-6)


def test_render_frames_in_chunks_match_one_batch_and_round_to_uint8():
    def render(cams: Cameras) -> torch.Tensor:  # grey level = azimuth / 360, slightly out of range at the ends
        level = (cams.azimuth / 360.0 * 1.2 - 0.1).view(-1, 1, 1, 1)
        return level.expand(len(cams), 3, 4, 6)

    cams = video.turntable_cameras(7, 0.0, 2.0, 6)
    chunked = video.render_frames(render, cams, chunk=3)
    whole = video.render_frames(render, cams, chunk=100)
    assert chunked.dtype == np.uint8 and chunked.shape == (7, 4, 6, 3)
    np.testing.assert_array_equal(chunked, whole)
    expected = np.clip(np.floor(np.clip(np.arange(7) / 7 * 1.2 - 0.1, 0, 1) * 255 + 0.5), 0, 255)
    np.testing.assert_array_equal(chunked[:, 0, 0, 0], expected)


def test_gif_decodes_back_frame_by_frame(tmp_path: Path):
    path = video.write_video(tmp_path / "t.gif", _solid_frames(10, 12), fps=20)
    with Image.open(path) as gif:
        assert gif.n_frames == len(COLOURS) and gif.size == (12, 10)
        assert gif.info["loop"] == 0 and gif.info["duration"] == 50
        for index, colour in enumerate(COLOURS):
            gif.seek(index)
            np.testing.assert_array_equal(np.asarray(gif.convert("RGB"))[5, 6], colour)
    _no_stray_files(tmp_path, {"t.gif"})


def test_mp4_decodes_back_with_odd_sizes_padded(tmp_path: Path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    path = video.write_video(tmp_path / "t.mp4", _solid_frames(21, 33), fps=10)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    assert tuple(meta["size"]) == (34, 22) and meta["fps"] == 10
    frames = [np.frombuffer(f, np.uint8).reshape(22, 34, 3) for f in reader]
    assert len(frames) == len(COLOURS)
    for frame, colour in zip(frames, COLOURS):  # lossy yuv420p: solid colours come back within a few levels
        assert np.abs(frame[4:18, 4:30].astype(int) - colour).max() <= 8
    _no_stray_files(tmp_path, {"t.mp4"})


def test_failed_writes_leave_nothing_and_mp4_without_ffmpeg_is_a_user_error(tmp_path: Path, monkeypatch):
    with pytest.raises(ValueError, match="uint8"):
        video.write_video(tmp_path / "bad.gif", np.zeros((2, 4, 4, 3), np.float32), fps=10)
    _no_stray_files(tmp_path, set())
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: None)
    assert video.default_format() == "gif"
    with pytest.raises(UserError, match="imageio-ffmpeg.*gif"):
        video.write_video(tmp_path / "x.mp4", _solid_frames(4, 4), fps=10)
    _no_stray_files(tmp_path, set())


@pytest.fixture(scope="module")
def gaussians_ply(tmp_path_factory) -> Path:
    g = Gaussians(GaussianConfig(num_points=200, init_radius=0.4), "cpu", torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("ply") / "blob.ply"
    g.save(path)
    return path


def test_result_renderer_reads_gaussians_and_meshes(gaussians_ply: Path, tmp_path: Path):
    import trimesh

    cams = video.turntable_cameras(2, 0.0, 2.0, 24)
    draw = video.result_renderer(gaussians_ply, torch.device("cpu"))
    direct = Gaussians.load(gaussians_ply, GaussianConfig(), "cpu").render(cams, torch.ones(3)).rgb
    torch.testing.assert_close(draw(cams), direct)
    # a mesh saved as PLY is drawn as a mesh: a unit box fills the centre and leaves the corners white
    box = tmp_path / "box.ply"
    trimesh.creation.box((1.0, 1.0, 1.0)).export(box)
    rgb = video.result_renderer(box, torch.device("cpu"))(cams)
    assert rgb.shape == (2, 3, 24, 24)
    assert torch.all(rgb[:, :, 12, 12] < 0.9) and torch.all(rgb[:, :, 0, 0] == 1.0)
    with pytest.raises(UserError, match="result not found"):
        video.result_renderer(tmp_path / "none.ply", torch.device("cpu"))


def test_render_command_writes_videos_and_refuses_to_overwrite(gaussians_ply: Path, tmp_path: Path, capsys):
    gif = tmp_path / "blob.gif"
    argv = ["render", str(gaussians_ply), "--video", str(gif), "--frames", "4", "--res", "32", "-q"]
    assert main(argv) == 0
    with Image.open(gif) as image:
        assert image.n_frames == 4 and image.size == (32, 32)
    before = gif.read_bytes()
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert gif.read_bytes() == before
    assert main(["render", str(tmp_path / "none.ply"), "--video", str(tmp_path / "n.gif")]) == 2
    assert main(["render", str(SPOT), "--video", str(tmp_path / "s.avi")]) == 2
    assert "use a .mp4 or .gif name" in capsys.readouterr().err
    if video.ffmpeg_exe() is not None:
        mp4 = tmp_path / "spot.mp4"
        assert main(["render", str(SPOT), "--video", str(mp4), "--frames", "3", "--res", "32", "-q"]) == 0
        assert mp4.stat().st_size > 0
