"""The white-Gaussian filter (paper §V, spec §6.6) on crafted Gaussians: visible white floaters go, a white
object's body, hidden or faint or small or off-white Gaussians stay; the cameras are visited in turn."""

import dataclasses
import math

import torch

from microdreamer.config import GaussianConfig
from microdreamer.io.ply import GaussianPLY
from microdreamer.render.gaussians import rasterize_gaussians
from microdreamer.representations.gaussians import SH_C0, Gaussians
from microdreamer.representations.white_filter import CAMERAS, FOVY, RADIUS, _pixels, white_floaters
from microdreamer.sir.cameras import Cameras

RES = 128  # the rule compares alphas at projected centres: any size that resolves these Gaussians will do
BODY = 0.9  # the brightest colour of a white object under the lit teacher (KeyLight: 0.4 + 0.5)
WHITE = 1.2  # a floater's colour: above 1 where the clamped render stopped pulling it back


def _scene() -> tuple[dict, dict[str, list[int]]]:
    """Rows of (centre, scale, opacity, colour) and what each group is."""
    rows, groups = [], {}

    def add(group: str, centre, scale: float, opacity: float, colour) -> None:
        groups.setdefault(group, []).append(len(rows))
        rows.append((centre, scale, opacity, colour if isinstance(colour, tuple) else (colour,) * 3))

    for x in (-0.12, 0.0, 0.12):  # a white object: an opaque column of shaded-white Gaussians
        for y in (-0.2, -0.1, 0.0, 0.1, 0.2):
            add("body", (x, y, 0.0), 0.08, 0.99, BODY)
    add("hidden", (0.0, 0.0, 0.0), 0.03, 0.9, WHITE)  # a white candidate inside the opaque body
    add("floater", (0.55, 0.35, 0.0), 0.05, 0.8, WHITE)  # seen by the first camera
    add("floater", (-0.5, -0.3, 0.2), 0.04, 0.7, WHITE)
    add("floater", (0.0, 0.1, -0.6), 0.05, 0.9, WHITE)  # right behind the body for the first camera
    add("small", (-0.5, 0.4, 0.0), 0.005, 0.9, WHITE)  # no scale above 0.01: not a candidate
    add("faint", (0.5, -0.4, 0.0), 0.03, 0.05, WHITE)  # barely visible: alpha drops by less than 0.1
    add("off_white", (-0.45, 0.1, -0.3), 0.05, 0.9, (WHITE, WHITE, 0.95))  # not white in every channel
    return rows, groups


def _tensors(rows):
    means = torch.tensor([r[0] for r in rows])
    scales = torch.tensor([[r[1]] * 3 for r in rows])
    opacities = torch.tensor([r[2] for r in rows])
    colours = torch.tensor([r[3] for r in rows])
    quats = torch.zeros(len(rows), 4)
    quats[:, 0] = 1
    return means, quats, scales, opacities, colours


def test_visible_white_floaters_go_and_everything_else_stays():
    rows, groups = _scene()
    removed = white_floaters(*_tensors(rows), resolution=RES)
    assert removed.nonzero()[:, 0].tolist() == groups["floater"]
    # the same object with colours drifted above 1 (an unshaded white object on white) would lose its surface
    means, quats, scales, opacities, colours = _tensors(rows)
    colours[groups["body"]] = WHITE
    eaten = white_floaters(means, quats, scales, opacities, colours, resolution=RES)
    assert int(eaten[groups["body"]].sum()) >= len(groups["body"]) // 2


def test_a_floater_behind_the_object_goes_when_a_later_camera_sees_it():
    rows, groups = _scene()
    behind = groups["floater"][2]
    means, quats, scales, opacities, colours = _tensors(rows)
    # from the first camera (azimuth 0, on +z) it projects onto the body, which hides it
    row, col, in_front = _pixels(means[[behind]], Cameras.orbit([0.0], [0.0], RADIUS, RES, FOVY))
    assert bool(in_front) and abs(int(col) - RES // 2) <= 1
    front = Cameras.orbit([0.0], [0.0], RADIUS, RES, FOVY)

    def alpha(keep):
        return rasterize_gaussians(means[keep], quats[keep], scales[keep], opacities[keep], colours[keep].clamp(0, 1),
                                   front, torch.zeros(3)).alpha[0, 0]

    everything = torch.ones(len(rows), dtype=torch.bool)
    without = everything.clone()
    without[behind] = False
    assert float(alpha(everything)[row, col] - alpha(without)[row, col]) < 0.01  # invisible from the front
    assert CAMERAS[0] == (0.0, 0.0) and (0.0, 180.0) in CAMERAS  # ... and seen from behind
    assert bool(white_floaters(means, quats, scales, opacities, colours, resolution=RES)[behind])


def test_pixels_are_the_projected_centres():
    camera = Cameras.orbit([0.0], [0.0], 2.0, 100, 49.0)
    fx, _ = camera.focal
    points = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.2, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    row, col, in_front = _pixels(points, camera)
    # azimuth 0 looks along −z from +z: world x is image right, world y image up, depth 2
    assert (row[0], col[0]) == (50, 50)
    assert int(col[1]) == math.floor(50 + fx * 0.3 / 2) and int(row[1]) == math.floor(50 - fx * 0.2 / 2)
    assert int(col[2]) == 99  # outside the image: the nearest border pixel, as the reference clamps
    assert in_front.tolist() == [True, True, True, False]  # behind the camera: left to the others


def test_finalize_removes_the_floaters_after_the_prune_and_counts_both():
    rows, groups = _scene()
    rows = rows + [((0.3, 0.3, 0.3), 0.05, 0.005, (WHITE,) * 3)]  # pruned first: opacity below 0.01
    means, quats, scales, opacities, colours = _tensors(rows)
    ply = GaussianPLY(means=means, f_dc=(colours - 0.5) / SH_C0, f_rest=torch.zeros(len(rows), 0, 3),
                      opacity=torch.logit(opacities), scale=scales.log(), rotation=quats)
    cfg = dataclasses.replace(GaussianConfig(), backend="auto")
    g = Gaussians(cfg, "cpu", torch.Generator().manual_seed(0), init=ply)
    g.finalize()
    assert g.cleanup == {"final_prune": 1, "white_filter": len(groups["floater"])}
    kept = [i for i in range(len(rows) - 1) if i not in groups["floater"]]
    torch.testing.assert_close(g.means.detach(), means[kept])
    off = Gaussians(dataclasses.replace(cfg, white_filter=False), "cpu", torch.Generator().manual_seed(0), init=ply)
    off.finalize()
    assert off.cleanup == {"final_prune": 1} and off.num_primitives == len(rows) - 1
