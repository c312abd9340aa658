"""The command line as a user meets it: bad input fails in one line with exit 2, runs write loadable files."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from microdreamer.cli import main

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.toml"
    f.write_text(
        "[schedule]\niterations = 2\nsteps = 2\ninit_steps = 2\ndenoise_steps = 10\n"
        "[cameras]\nviews = 2\nresolution = 48\n[gaussians]\nnum_points = 300\nbackend = \"auto\"\n"
    )
    return f


def _writable(folder: Path) -> bool:
    try:
        handle, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.unlink(probe)
    return True


@pytest.fixture
def workspace(tmp_path: Path):
    """What the refusal table points at: a valid image, an unreadable one, a mesh that is none, a plain file,
    and a folder nothing can be written in, holding an image. That folder is read-only for a normal user
    (mode 555); root ignores modes, so for root it is made immutable (chattr +i), as a read-only mount is."""
    _rgba_file(tmp_path / "cat.png")
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "notes.obj").write_text("this is not a mesh")
    (tmp_path / "afile.txt").write_text("a file, not a folder")
    for name, steps in (("untrained", ()), ("stage1", (1,))):  # GECO Stage I run folders, with no weights
        config = {"stage": 1, "config": {"model": None, "generator_timestep": 999, "guidance_generator": 4.0,
                                         "view_size": 320}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        for step in steps:
            (tmp_path / name / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
            (tmp_path / name / "checkpoints" / f"step-{step:08d}" / "state.json").write_text('{"files": []}')
    locked = tmp_path / "locked"
    locked.mkdir()
    _rgba_file(locked / "in.png")
    locked.chmod(0o555)
    if _writable(locked) and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(locked)], capture_output=True)
    yield tmp_path
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
    locked.chmod(0o755)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _no_work(monkeypatch) -> None:
    """Fail the test if a command starts what a refusal must come before: a teacher, a mesh export, a
    render, an evaluation or a download."""
    from microdreamer import api, evaluate, evaluate_geco, metrics_clip, pipeline, video
    from microdreamer.teachers import catalog

    def refuse(*args, **kwargs):
        raise AssertionError("the command started working before refusing its input")

    monkeypatch.setattr(pipeline.ImageTo3D, "__init__", refuse)
    for name in ("export_saved_run", "result_renderer", "evaluate_model", "evaluate_mesh"):
        monkeypatch.setattr(api, name, refuse)  # the commands reach them through the API
    for module, name in [(pipeline, "export_saved_run"), (video, "result_renderer"), (evaluate, "evaluate_model"),
                         (evaluate, "evaluate_mesh"), (evaluate_geco, "evaluate_geco"), (catalog, "download"), (metrics_clip.ClipSimilarity, "load")]:
        monkeypatch.setattr(module, name, refuse)


OUT = ["--out", "{tmp}/out"]
REFUSALS = [
    # the output folder: a file, a path through a file, a folder nothing can be written in
    (["image2gs", "{image}", "--out", "{file}"], "--out {file} is a file, not a folder"),
    (["image2gs", "{image}", "--out", "{file}/sub"], "{file} is a file, not a folder"),
    (["image2gs", "{image}", "--out", "{locked}/out"], "cannot write in {locked}"),
    (["image2gs", "{image}", *OUT, "--manifest", "{locked}/m.json"], "--manifest {locked}/m.json: cannot write in"),
    (["image2gs", "{image}", *OUT, "--manifest", "{tmp}"], "--manifest {tmp} is a folder"),
    (["image2mesh", "{image}", "--out", "{locked}"], "cannot write in {locked}"),
    (["text2gs", "a cat", "--out", "{file}"], "is a file, not a folder"),
    (["text2mesh", "a cat", "--out", "{locked}/sub"], "cannot write in {locked}"),
    (["export", "{file}", "--out", "{locked}"], "cannot write in {locked}"),
    (["eval", "{file}", "--reference", "{spot}", "--json", "{locked}/scores.json"], "--json {locked}/scores.json"),
    (["render", "{file}", "--video", "{locked}/spin.gif"], "--video {locked}/spin.gif: cannot write in"),
    (["render", "{file}", "--video", "{file}/spin.gif"], "{file} is a file, not a folder"),
    (["preprocess", "{image}", "--out", "{file}"], "is a file, not a folder"),
    (["preprocess", "{locked}/in.png"], "beside each input"),
    (["selftest", "--out", "{file}"], "is a file, not a folder"),
    (["models", "download", "mvdream", "--cache-dir", "{locked}/hub"], "--cache-dir {locked}/hub: cannot write in"),
    (["models", "download", "mvdream", "--cache-dir", "{file}"], "is a file, not a folder"),
    # run settings, from flags (RunConfig.validate names the flag and the key)
    (["image2gs", "{image}", *OUT, "--seed", "99999999999999999999999"], "--seed must be a whole number in 0.."),
    (["image2gs", "{image}", *OUT, "--seed", "-1"], "--seed"),
    (["image2gs", "{image}", *OUT, "--elevation", "200"], "--elevation (cameras.elevation) must lie strictly between -90 and 90"),
    (["image2gs", "{image}", *OUT, "--teacher", "reference", "--shading", "flat"],
     "--shading (teacher.shading) must be lit or albedo, got 'flat'"),
    (["image2mesh", "{image}", *OUT, "--imperfection", "moderate"],
     "--imperfection (teacher.imperfection) applies to the reference teacher only, not 'stable-zero123'"),
    (["image2gs", "{image}", *OUT, "--elevation", "nan"], "--elevation"),
    (["image2gs", "{image}", *OUT, "--views", "0"], "--views"),
    (["image2gs", "{image}", *OUT, "--res", "7"], "--res (cameras.resolution) must lie in 16..2048, got 7"),
    (["image2gs", "{image}", *OUT, "--iters", "0"], "--iters"),
    (["image2gs", "{image}", *OUT, "--iters", "abc"], "--iters"),
    (["image2gs", "{image}", *OUT, "--steps", "0"], "--steps"),
    (["image2gs", "{image}", *OUT, "--backend", "nope"], "--backend"),
    (["image2gs", "{image}", *OUT, "--border-ratio", "1.5"], "--border-ratio"),
    (["image2gs", "{image}", *OUT, "--video-format", "avi"], "avi"),
    (["image2mesh", "{image}", *OUT, "--faces", "0"], "--faces"),
    (["image2mesh", "{image}", *OUT, "--texture-size", "1000"], "--texture-size"),
    (["image2mesh", "{image}", *OUT, "--grid", "8"], "--grid"),
    (["image2mesh", "{image}", *OUT, "--threshold", "nan"], "--threshold"),
    (["image2mesh", "{image}", *OUT, "--scale", "inf"], "--scale"),
    (["image2mesh", "{image}", *OUT, "--up", "x"], "--up"),
    (["image2mesh", "{image}", *OUT, "--format", "fbx"], "--format"),
    (["image2mesh", "{image}", *OUT, "--refine-steps", "-1"], "--refine-steps"),
    (["text2gs", "a cat", *OUT, "--seed", "-5"], "--seed"),
    (["text2gs", "a cat", *OUT, "--views", "6"], "--views must be a multiple of 4, got 6"),
    (["text2gs", "a cat", *OUT, "--res", "4096"], "--res"),
    (["text2mesh", "a cat", *OUT, "--faces", "50"], "--faces"),
    (["export", "{file}", *OUT, "--faces", "0"], "--faces"),
    (["export", "{file}", *OUT, "--seed", "-1"], "--seed"),
    # options of one command (typer callbacks name the option as typed)
    (["render", "{file}", "--res", "7"], "'--res': must lie in 16..4096, got 7"),
    (["render", "{file}", "--frames", "0"], "'--frames'"),
    (["render", "{file}", "--fps", "1000"], "'--fps'"),
    (["render", "{file}", "--elevation", "90"], "'--elevation': must lie strictly between -90 and 90 degrees"),
    (["render", "{file}", "--radius", "nan"], "'--radius'"),
    (["render", "{file}", "--fovy", "180"], "'--fovy'"),
    (["render", "{file}", "--azimuth", "inf"], "'--azimuth'"),
    (["render", "{file}", "--video", "{tmp}/spin.avi"], "use a .mp4 or .gif name"),
    (["eval", "{file}", "--reference", "{spot}", "--res", "7"], "'--res'"),
    (["eval", "{file}", "--reference", "{spot}", "--radius", "-1"], "'--radius'"),
    (["preprocess", "{image}", "--size", "8"], "--size"),
    (["preprocess", "{image}", "--border-ratio", "1"], "--border-ratio"),
    (["selftest", "--min-psnr", "nan"], "'--min-psnr'"),
    # flags take no value: the word would become an input
    (["image2gs", "{image}", *OUT, "--video", "true"], "--video is a flag and takes no value"),
    (["text2gs", "a cat", *OUT, "--video", "yes"], "--video is a flag"),
    (["image2gs", "{image}", *OUT, "--rembg", "false"], "--no-rembg to turn it off"),
    (["export", "{file}", "--refine", "false"], "--refine is a flag"),
    (["render", "{file}", "--overwrite", "true"], "--overwrite is a flag"),
    (["presets", "show", "reference", "--json", "true"], "--json is a flag"),
    (["models", "list", "--json", "yes"], "--json is a flag"),
    # inputs and names
    (["image2gs", "{tmp}/missing.png", *OUT], "input image not found"),
    (["image2gs", "{tmp}/notes.png", *OUT], "not an image"),
    (["image2gs", "{image}", *OUT, "--teacher", "nope"], "unknown teacher 'nope'"),
    (["image2gs", "--teacher", "reference", "--model", "{spot}", "--preset", "nope", *OUT], "unknown preset"),
    (["image2gs", "--teacher", "reference", "--model", "{tmp}/none.obj", *OUT], "mesh file not found: {tmp}/none.obj"),
    (["image2gs", "--teacher", "reference", *OUT], "--model MESH"),
    (["image2gs", *OUT], "needs an input image"),
    (["text2gs", "a cat", *OUT, "--model", "{tmp}/no-model"], "model folder not found"),
    (["export", "{tmp}/none.ply"], "result not found"),
    (["eval", "{tmp}/none.ply", "--reference", "{spot}"], "result not found"),
    (["eval", "{file}"], "eval needs --reference MESH"),
    (["eval", "{file}", "--protocol", "psnr"], "unknown protocol 'psnr' (use held-out, clip or geco)"),
    (["eval", "{file}", "--protocol", "geco"], "eval --protocol geco needs --reference MESH"),
    (["eval", "{file}", "--reference", "{spot}", "--lpips-vgg", "{file}"], "--lpips-vgg and --lpips-heads belong to --protocol geco"),
    (["eval", "{file}", "--protocol", "geco", "--reference", "{spot}", "--lpips-vgg", "{file}"], "LPIPS needs both --lpips-vgg and --lpips-heads"),
    (["eval", "{file}", "--protocol", "geco", "--reference", "{tmp}/none.obj"], "reference mesh not found: {tmp}/none.obj"),
    (["eval", "{file}", "--reference", "{spot}", "--prompt", "a cat"], "--clip-model, --image and --prompt belong to --protocol clip"),
    # eval --protocol clip: the CLIP model, what the result is compared with
    (["eval", "{file}", "--protocol", "clip"], "--protocol clip needs --clip-model"),
    (["eval", "{file}", "--protocol", "clip", "--clip-model", "{tmp}", "--reference", "{spot}"], "belong to the held-out protocol"),
    (["eval", "{file}", "--protocol", "clip", "--clip-model", "{tmp}"], "nothing to compare afile.txt with"),
    (["eval", "{file}", "--protocol", "clip", "--clip-model", "{tmp}", "--image", "{tmp}/gone.png"], "{tmp}/gone.png: no such file"),
    (["eval", "{file}", "--protocol", "clip", "--clip-model", "{tmp}", "--image", "{tmp}/notes.png"], "not an image"),
    (["eval", "{file}", "--protocol", "clip", "--clip-model", "{tmp}", "--prompt", " "], "empty prompt"),
    (["eval", "{file}", "--protocol", "clip", "--clip-model", "{tmp}", "--prompt", "a cat"], "{tmp} has no config.json"),
    (["eval", "{file}", "--protocol", "clip", "--clip-model", "{tmp}/nothing", "--prompt", "a cat"], "model folder not found: {tmp}/nothing"),
    (["models", "download", "nope"], "unknown model 'nope'"),
    (["presets", "show", "nope"], "unknown preset 'nope'"),
    # the NeRF commands refuse as the Gaussian ones do (the same code paths)
    (["image2nerf", "{image}", "--out", "{file}"], "--out {file} is a file, not a folder"),
    (["text2nerf", "a cat", "--out", "{locked}/sub"], "cannot write in {locked}"),
    (["text2nerf", "a cat", *OUT, "--manifest", "{tmp}"], "--manifest {tmp} is a folder"),
    (["image2nerf", "{image}", *OUT, "--seed", "-1"], "--seed must be a whole number in 0.."),
    (["image2nerf", "{image}", *OUT, "--res", "7"], "--res (cameras.resolution) must lie in 16..2048, got 7"),
    (["image2nerf", "{image}", *OUT, "--elevation", "nan"], "--elevation"),
    (["image2nerf", "{image}", *OUT, "--video-format", "avi"], "avi"),
    (["image2nerf", "{image}", *OUT, "--video", "true"], "--video is a flag and takes no value"),
    (["text2nerf", "a cat", *OUT, "--views", "6"], "--views must be a multiple of 4, got 6"),
    (["text2nerf", "a cat", *OUT, "--iters", "0"], "--iters"),
    # a CUDA library's backend on the CPU: refused before the teacher loads
    (["image2gs", "{image}", *OUT, "--device", "cpu", "--backend", "gsplat"],
     "rasterizer backend 'gsplat' needs CUDA tensors, not cpu; use 'auto'"),
    (["image2nerf", "{image}", *OUT, "--device", "cpu", "--backend", "nerfacc"],
     "volume backend 'nerfacc' needs CUDA tensors, not cpu; use 'auto'"),
    (["image2nerf", "{image}", *OUT, "--backend", "gsplat"], "--backend (nerf.backend) must be auto, torch, cpu"),
    (["image2nerf", "{tmp}/missing.png", *OUT], "input image not found"),
    (["image2nerf", "{tmp}/notes.png", *OUT], "not an image"),
    (["image2nerf", "{image}", *OUT, "--teacher", "nope"], "unknown teacher 'nope'"),
    (["image2nerf", "{image}", *OUT, "--teacher", "mvdream"], "generates from text alone: use text2nerf PROMPT"),
    (["image2nerf", "{image}", *OUT, "--prompt", "a cat"], "--prompt needs an image+text teacher"),
    (["image2nerf", "{image}", *OUT, "--preset", "nope"], "unknown preset 'nope'"),
    (["image2nerf", *OUT], "needs an input image"),
    (["text2nerf", "a cat", *OUT, "--teacher", "stable-zero123"], "text2nerf needs a text-to-3D teacher (mvdream)"),
    (["text2nerf", " ", *OUT], "empty prompt"),
    (["image2mesh", "{image}", *OUT, "--representation", "voxels"], "unknown representation 'voxels'"),
    (["text2mesh", "a cat", *OUT, "--representation", "nerf", "--threshold", "0"], "--threshold"),
    (["export", "{tmp}/none.safetensors"], "result not found"),
    (["eval", "{tmp}/none.safetensors", "--reference", "{spot}"], "result not found"),
    # the feed-forward path (--method lgm, --init lgm) and its weights
    (["image2gs", "{image}", *OUT, "--method", "nope"], "--method must be sir, lgm or geco, got 'nope'"),
    (["image2gs", "{image}", *OUT, "--init", "nope"], "--init must be random, lgm or geco, got 'nope'"),
    (["image2gs", "{image}", *OUT, "--method", "lgm", "--init", "lgm"], "--init lgm starts SIR from LGM's Gaussians"),
    (["image2gs", "{image}", *OUT, "--teacher", "zero123plus"], "not an SIR teacher"),
    (["image2gs", "{image}", *OUT, "--teacher", "stable-zero123", "--method", "lgm"],
     "'stable-zero123' does not make LGM's four views: --method lgm needs a teacher that does"),
    (["image2gs", "{image}", *OUT, "--teacher", "zero123plus", "--init", "lgm"],
     "--init lgm needs an SIR teacher that does (imagedream, mvdream, reference)"),
    (["image2gs", "{image}", *OUT, "--method", "lgm", "--reconstructor", "{tmp}/none"], "model folder not found: {tmp}/none"),
    (["image2gs", "{image}", *OUT, "--method", "lgm", "--reconstructor", "{tmp}"], "has no model_fp16_fixrot.safetensors"),
    (["image2gs", "{image}", *OUT, "--init", "lgm", "--teacher", "imagedream", "--reconstructor", "{file}"],
     "only .safetensors weights"),
    (["image2mesh", "{image}", *OUT, "--teacher", "zero123plus", "--method", "lgm", "--refine-steps", "5"],
     "'zero123plus' is no SIR teacher and cannot refine a mesh texture: pass --refine-steps 0"),
    (["text2gs", "a cat", *OUT, "--method", "lgm", "--teacher", "imagedream"], "needs a text-to-3D teacher"),
    (["text2mesh", "a cat", *OUT, "--init", "lgm", "--reconstructor", "{tmp}/none"], "model folder not found"),
    # a distilled GECO run (--method geco --model RUN_DIR)
    (["image2gs", "{image}", *OUT, "--method", "geco"], "--method geco runs a distilled run: pass --model RUN_DIR"),
    (["image2gs", "{image}", *OUT, "--method", "geco", "--model", "{tmp}"],
     "--model {tmp} is not a run folder of `microdreamer distill` (config.json is missing)"),
    (["image2gs", "{image}", *OUT, "--method", "geco", "--model", "{tmp}/untrained"],
     "--model {tmp}/untrained has no complete checkpoint yet"),
    (["image2gs", "{image}", *OUT, "--method", "geco", "--model", "{tmp}/stage1", "--reconstructor", "{tmp}/none"],
     "model folder not found: {tmp}/none"),
    (["image2gs", "{image}", *OUT, "--method", "geco", "--model", "{tmp}/stage1", "--teacher", "imagedream"],
     "--method geco runs a GECO run folder (--model RUN_DIR) and no other teacher: leave out --teacher"),
    (["image2gs", "{image}", *OUT, "--method", "geco", "--model", "{tmp}/stage1", "--init", "lgm"],
     "--init lgm starts SIR from LGM's Gaussians; --method geco gives them without SIR: choose one"),
    (["image2gs", "{image}", *OUT, "--teacher", "geco"], "'geco' (a distilled GECO run) is no SIR teacher"),
    # SIR started from a GECO run's Gaussians (--init geco --init-model RUN_DIR)
    (["image2gs", "{image}", *OUT, "--teacher", "imagedream", "--init", "geco"],
     "--init geco starts SIR from a distilled run: pass --init-model RUN_DIR"),
    (["image2gs", "{image}", *OUT, "--teacher", "imagedream", "--init", "geco", "--init-model", "{tmp}"],
     "--init-model {tmp} is not a run folder of `microdreamer distill` (config.json is missing)"),
    (["image2gs", "{image}", *OUT, "--teacher", "imagedream", "--init", "geco", "--init-model", "{tmp}/untrained"],
     "--init-model {tmp}/untrained has no complete checkpoint yet"),
    (["image2gs", "{image}", *OUT, "--method", "lgm", "--teacher", "imagedream", "--init", "geco", "--init-model",
      "{tmp}/stage1"], "--init geco starts SIR from a GECO run's Gaussians; --method lgm gives them without SIR"),
    (["image2gs", "{image}", *OUT, "--method", "geco", "--model", "{tmp}/stage1", "--init", "geco", "--init-model",
      "{tmp}/stage1"], "--init geco starts SIR from a GECO run's Gaussians; --method geco gives them without SIR"),
    (["image2gs", "{image}", *OUT, "--init", "geco", "--init-model", "{tmp}/stage1"],
     "--init geco runs SIR with a teacher's -lgm-init preset; 'stable-zero123' has none: pass --teacher imagedream, "
     "mvdream or reference, or --preset"),
    (["image2gs", "{image}", *OUT, "--teacher", "imagedream", "--init-model", "{tmp}/stage1"],
     "--init-model names the GECO run SIR starts from: add --init geco, or leave it out"),
    (["image2mesh", "{image}", *OUT, "--method", "geco", "--model", "{tmp}/stage1", "--refine-steps", "5"],
     "'geco' is no SIR teacher and cannot refine a mesh texture: pass --refine-steps 0"),
]


@pytest.mark.parametrize("args, message", REFUSALS, ids=[" ".join(a[:1] + a[2:]) for a, _ in REFUSALS])
def test_bad_input_is_one_line_exit_2_before_any_work_and_writes_nothing(workspace: Path, capsys, monkeypatch,
                                                                           args, message):
    def fill(text: str) -> str:
        return text.format(tmp=workspace, spot=SPOT, image=workspace / "cat.png", file=workspace / "afile.txt",
                           locked=workspace / "locked")

    if "{locked}" in " ".join(args) and _writable(workspace / "locked"):
        pytest.skip("this machine cannot make a folder read-only")
    _no_work(monkeypatch)
    before = _tree(workspace)
    assert main([fill(a) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert fill(message) in captured.err
    assert _tree(workspace) == before


@pytest.mark.parametrize("args, message", [
    (["image2gs", "--teacher", "reference", "--model", "{tmp}/notes.obj"], "notes.obj contains no triangles"),
])
def test_a_teacher_that_cannot_load_is_one_error_line_after_the_progress(tmp_path: Path, capsys, args, message):
    (tmp_path / "notes.obj").write_text("this is not a mesh")
    out = tmp_path / "out"
    assert main([a.format(tmp=tmp_path) for a in args] + ["--out", str(out)]) == 2
    *progress, error = capsys.readouterr().err.splitlines()
    assert error.startswith("error: ") and message in error
    assert progress == ["notes: loading the teacher"]  # off a terminal progress is plain lines; no "loaded"
    assert not out.exists()


def test_flags_show_no_value_in_the_help(capsys):
    for command in (["image2gs"], ["text2mesh"], ["export"], ["render"], ["preprocess"], ["models", "list"]):
        assert main([*command, "--help"]) == 0
        rows = [line for line in capsys.readouterr().out.splitlines() if "--" in line and "--help" not in line]
        assert any("--overwrite" in row or "--json" in row for row in rows)
        assert not [row for row in rows if "<bool>" in row or "BOOLEAN" in row]


@pytest.mark.slow
def test_image2gs_reference_run_writes_loadable_outputs_and_eval_reads_them(tmp_path: Path, capsys, tiny_config):
    import trimesh
    from PIL import Image

    from microdreamer.config import GaussianConfig
    from microdreamer.representations.gaussians import Gaussians

    out = tmp_path / "out"
    argv = ["image2gs", "--teacher", "reference", "--model", str(SPOT), "--config", str(tiny_config),
            "--out", str(out), "--seed", "3", "-q"]
    assert main(argv) == 0
    ply, sheet, report = out / "spot.ply", out / "spot_views.png", out / "spot.json"
    assert sorted(p.name for p in out.iterdir()) == ["spot.json", "spot.ply", "spot_views.png"]
    gaussians = Gaussians.load(ply, GaussianConfig(), __import__("torch").device("cpu"))
    assert gaussians.num_primitives > 0
    assert Image.open(sheet).size == (4 * 48, 2 * 48)
    data = json.loads(report.read_text())
    assert data["seed"] == 3 and data["config"]["schedule"]["iterations"] == 2
    assert data["primitives"] == gaussians.num_primitives
    assert data["evaluations"]["total"] > 0 and data["evaluations"]["guided"] > 0
    assert {"sir.render", "sir.backward", "sir.teacher", "sir.update", "export"} <= set(data["timings"])
    seconds = [it["seconds"] for it in data["iterations"]]
    assert len(seconds) == 3 and min(seconds) > 0 and sum(seconds) <= data["timings"]["sir"]
    assert set(data["peak_memory"]) == {"process_rss_gib"} and 0.1 < data["peak_memory"]["process_rss_gib"] < 24
    assert data["teacher_mode"] == "lit, imperfection none" and data["config"]["teacher"]["shading"] == "lit"
    assert set(data["cleanup"]) == {"final_prune", "white_filter"} and min(data["cleanup"].values()) >= 0
    assert trimesh.load(ply, process=False) is not None  # a standard PLY other tools open

    # the reference teacher's modes are flags, recorded in the report
    plain = tmp_path / "albedo"
    assert main(argv[:-5] + ["--out", str(plain), "--seed", "3", "--shading", "albedo", "--imperfection", "moderate",
                             "-q"]) == 0
    data = json.loads((plain / "spot.json").read_text())
    assert data["teacher_mode"] == "albedo, imperfection moderate"
    assert data["config"]["teacher"]["shading"] == "albedo" and data["config"]["teacher"]["imperfection"] == "moderate"

    # never overwrite silently; the existing file is untouched
    before = ply.read_bytes()
    assert main(argv) == 2
    assert "already exists" in _error_line(capsys)
    assert ply.read_bytes() == before

    # same seed, same result
    again = tmp_path / "again"
    assert main(argv[:-5] + ["--out", str(again), "--seed", "3", "-q"]) == 0
    assert (again / "spot.ply").read_bytes() == before

    scores = tmp_path / "scores.json"
    assert main(["eval", str(ply), "--reference", str(SPOT), "--json", str(scores), "--res", "64"]) == 0
    result = json.loads(scores.read_text())
    assert len(result["views"]) == 16 and 5.0 < result["mean_psnr"] < 60.0
    assert result["shading"] == "lit"  # as the run's report says
    albedo = tmp_path / "albedo.json"
    assert main(["eval", str(ply), "--reference", str(SPOT), "--json", str(albedo), "--res", "64",
                 "--shading", "albedo"]) == 0
    apart = json.loads(albedo.read_text())
    assert apart["shading"] == "albedo" and apart["mean_psnr"] == pytest.approx(result["mean_albedo_psnr"])
    assert apart["mean_psnr"] != pytest.approx(result["mean_psnr"])
    assert main(["eval", str(ply), "--reference", str(SPOT), "--shading", "flat"]) == 2
    assert "unknown shading 'flat'" in _error_line(capsys)


@pytest.mark.slow
def test_selftest_clears_its_threshold_on_the_bundled_cow_and_fails_below_a_higher_one(tmp_path: Path, capsys):
    """One real selftest (the reference preset on Spot, lit teacher): asked for 99 dB it fails with exit 1, and
    the PSNR it printed, which the saved Gaussians score again through eval, clears the shipped threshold."""
    import re

    import torch

    from microdreamer.cli import SELFTEST_MIN_PSNR
    from microdreamer.evaluate import evaluate_model

    assert main(["selftest", "--device", "cpu", "--min-psnr", "99", "--out", str(tmp_path)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    line = re.search(r"FAIL selftest \(lit teacher\): mean held-out PSNR ([\d.]+) dB \(threshold 99.0\)", err)
    assert line is not None, err
    printed = float(line.group(1))
    assert printed >= SELFTEST_MIN_PSNR
    again = evaluate_model(tmp_path / "spot.ply", SPOT, torch.device("cpu"))
    assert again.shading == "lit" and again.mean_psnr == pytest.approx(printed, abs=0.005)


# batch, preprocessing, presets, models ------------------------------------------------------------

MICRO = (
    "[schedule]\niterations = 1\nsteps = 1\ninit_steps = 1\ndenoise_steps = 4\n"
    "[cameras]\nviews = 1\nresolution = 32\n[gaussians]\nnum_points = 100\nbackend = \"auto\"\n"
)


@pytest.fixture(scope="module")
def cow_pngs(tmp_path_factory) -> list[Path]:
    """Two RGBA renders of Spot (names with dots), as a user's transparent PNGs."""
    import numpy as np
    import torch
    from PIL import Image

    from microdreamer.sir.cameras import Cameras
    from microdreamer.teachers.reference import ReferenceTeacher

    folder = tmp_path_factory.mktemp("cows")
    teacher = ReferenceTeacher(SPOT, resolution=64)
    paths = []
    for index, azimuth in enumerate([0.0, 50.0]):
        out = teacher.render(Cameras.orbit([0.0], [azimuth], 2.0, 64))
        rgba = torch.cat([out.rgb, out.alpha], 1)[0].permute(1, 2, 0).numpy()
        path = folder / f"cow.v{index}.png"
        Image.fromarray((rgba * 255 + 0.5).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def micro_config(tmp_path: Path) -> Path:
    f = tmp_path / "micro.toml"
    f.write_text(MICRO)
    return f


def _batch_folder(root: Path, cows: list[Path]) -> Path:
    import shutil

    folder = root / "photos"
    folder.mkdir()
    for cow in cows:
        shutil.copy(cow, folder / cow.name)
    (folder / "broken.png").write_bytes(cows[0].read_bytes()[:150])  # truncated PNG
    (folder / "notes.png").write_text("a text file with an image name")
    (folder / "readme.txt").write_text("not an input")
    return folder


def _no_model_load(monkeypatch) -> None:
    from microdreamer import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher must not be loaded")

    monkeypatch.setattr(pipeline.ImageTo3D, "__init__", refuse)


@pytest.mark.slow
def test_batch_reports_failures_in_the_manifest_resumes_and_reproduces(
    tmp_path: Path, capsys, monkeypatch, cow_pngs, micro_config
):
    import numpy as np
    from PIL import Image

    folder = _batch_folder(tmp_path, cow_pngs)
    out = tmp_path / "out"
    argv = ["image2gs", str(folder), "--teacher", "reference", "--model", str(SPOT), "--config", str(micro_config),
            "--out", str(out), "--seed", "4", "--border-ratio", "0.3", "--no-rembg", "--json", "-q"]
    assert main(argv) == 1  # something failed
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # stdout holds the JSON summary and nothing else
    assert sorted(captured.err.splitlines())[0].startswith(f"failed: {folder / 'broken.png'}: ")  # even with -q
    manifest = json.loads((out / "manifest.json").read_text())
    assert printed == manifest
    entries = {Path(e["input"]).name: e for e in manifest["entries"]}
    assert set(entries) == {"broken.png", "cow.v0.png", "cow.v1.png", "notes.png"}
    assert manifest["counts"] == {"done": 2, "failed": 2, "skipped": 0, "interrupted": 0, "pending": 0}
    assert manifest["ignored"] == [str(folder / "readme.txt")]  # not an image suffix: named, not run
    assert "truncated or corrupt" in entries["broken.png"]["error"]
    assert "not an image" in entries["notes.png"]["error"]
    stems = ["cow.v0", "cow.v1"]
    expected = sorted(f"{s}{suffix}" for s in stems for suffix in (".json", ".ply", "_rgba.png", "_views.png"))
    assert sorted(p.name for p in out.iterdir()) == sorted(expected + ["manifest.json"])
    done = entries["cow.v0.png"]
    # precedence: preset (radius, teacher) < --config (steps, resolution) < flags (seed)
    assert done["status"] == "done" and done["seed"] == 4 and done["config"]["seed"] == 4
    assert done["config"]["schedule"]["steps"] == 1 and done["config"]["cameras"]["resolution"] == 32
    assert done["config"]["teacher"]["name"] == "reference" and done["config"]["cameras"]["radius"] == 2.0
    assert done["evaluations"]["total"] > 0 and "sir" in done["timings"]
    assert done["peak_memory"] == json.loads((out / "cow.v0.json").read_text())["peak_memory"]
    assert set(done["outputs"]) == {"ply", "views", "report", "rgba"}
    rgba = np.asarray(Image.open(out / "cow.v0_rgba.png"))
    assert rgba.shape == (256, 256, 4)
    rows = np.flatnonzero(rgba[:, :, 3].any(axis=1))
    cols = np.flatnonzero(rgba[:, :, 3].any(axis=0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 == round(256 * 0.7)  # --border-ratio 0.3

    # resume: nothing is redone, the teacher is not even loaded
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.json"}
    capsys.readouterr()
    with monkeypatch.context() as m:
        _no_model_load(m)
        assert main(argv[:-2] + ["--skip-existing"]) == 1
    summary = " ".join(capsys.readouterr().err.split())
    assert "2 failed, 2 skipped" in summary and "ignored 1 file without an image suffix" in summary
    assert summary.endswith("readme.txt")
    again = json.loads((out / "manifest.json").read_text())
    assert again["counts"]["skipped"] == 2 and again["counts"]["failed"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.json"} == stamps

    # the JSON written beside an output reproduces it bit for bit
    capsys.readouterr()
    copy = tmp_path / "again"
    assert main(["image2gs", str(folder / "cow.v0.png"), "--config", str(out / "cow.v0.json"),
                 "--out", str(copy), "--json", "-q"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert [e["status"] for e in single["entries"]] == ["done"]
    first, second = json.loads((out / "cow.v0.json").read_text()), json.loads((copy / "cow.v0.json").read_text())
    assert second["config"] == first["config"] and second["preprocess"] == first["preprocess"]
    assert (copy / "cow.v0.ply").read_bytes() == (out / "cow.v0.ply").read_bytes()
    assert (copy / "cow.v0_rgba.png").read_bytes() == (out / "cow.v0_rgba.png").read_bytes()
    assert not (copy / "manifest.json").exists()  # a single run writes no manifest


@pytest.mark.slow
def test_ctrl_c_leaves_no_partial_outputs_and_the_manifest_says_what_finished(
    tmp_path: Path, capsys, monkeypatch, cow_pngs, micro_config
):
    import shutil

    from microdreamer.representations.gaussians import Gaussians

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ["a.png", "b.png", "c.png"]:
        shutil.copy(cow_pngs[0], folder / name)
    save = Gaussians.save
    calls = []

    def save_then_interrupt(self, path):
        calls.append(path)
        if len(calls) == 2:  # Ctrl-C in the middle of writing b's outputs
            Path(path).write_bytes(b"half a ply")
            raise KeyboardInterrupt
        save(self, path)

    monkeypatch.setattr(Gaussians, "save", save_then_interrupt)
    out = tmp_path / "out"
    argv = ["image2gs", str(folder), "--teacher", "reference", "--model", str(SPOT), "--config", str(micro_config),
            "--out", str(out), "--video-format", "gif", "-q"]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json", "a.ply", "a_rgba.png", "a_turntable.gif", "a_views.png", "manifest.json"
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["interrupted"] is True
    assert [e["status"] for e in manifest["entries"]] == ["done", "interrupted", "pending"]
    assert manifest["entries"][0]["outputs"]["video"] == str(out / "a_turntable.gif")


def _rgba_file(path: Path, size=(120, 80), box=(10, 20, 40, 60)) -> Path:
    import numpy as np
    from PIL import Image

    rgba = np.zeros((size[1], size[0], 4), np.uint8)
    x0, y0, x1, y1 = box
    rgba[y0:y1, x0:x1] = (30, 120, 200, 255)
    Image.fromarray(rgba).save(path)
    return path


def test_preprocess_rgba_and_white_jpg_and_folder_mode(tmp_path: Path, capsys):
    import numpy as np
    from PIL import Image, ImageDraw

    photos = tmp_path / "photos"
    photos.mkdir()
    _rgba_file(photos / "my.cat.v2.png")  # 30 wide, 40 tall, off centre
    white = Image.new("RGB", (200, 160), "white")
    ImageDraw.Draw(white).rectangle((60, 40, 139, 119), fill=(200, 30, 30))  # an 80x80 square
    white.save(photos / "ball.jpg", quality=95)
    assert main(["preprocess", str(photos), "--no-rembg", "-q"]) == 0
    assert sorted(p.name for p in photos.iterdir()) == ["ball.jpg", "ball_rgba.png", "my.cat.v2.png",
                                                       "my.cat.v2_rgba.png"]
    cat = np.asarray(Image.open(photos / "my.cat.v2_rgba.png"))
    rows, cols = np.flatnonzero(cat[:, :, 3].any(1)), np.flatnonzero(cat[:, :, 3].any(0))
    # the longer side becomes round(256 · 0.8) = 205, the shorter 30 · 205/40 ≈ 154, centred
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (25, 230, 51, 205)
    assert tuple(cat[128, 128]) == (30, 120, 200, 255)
    ball = np.asarray(Image.open(photos / "ball_rgba.png"))
    assert ball[128, 128, 3] == 255 and np.abs(ball[128, 128, :3].astype(int) - (200, 30, 30)).max() <= 6
    assert ball[5, 5, 3] == 0 and ball[250, 250, 3] == 0
    rows = np.flatnonzero(ball[:, :, 3].any(1))  # the found mask, recentred and scaled like the RGBA one
    assert (rows[0], rows[-1] + 1) == (25, 230)
    # fully opaque up to the soft edge band (JPEG ringing, about 2 source pixels = 5 px here on each side)
    core = np.flatnonzero((ball[:, :, 3] == 255).any(1))
    assert 190 <= core[-1] + 1 - core[0] <= 205

    # folder mode never takes its own outputs as inputs, and resumes
    assert main(["preprocess", str(photos), "--no-rembg", "--skip-existing", "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [e["status"] for e in summary["entries"]] == ["skipped", "skipped"]
    assert not any("_rgba_rgba" in p.name for p in photos.iterdir())
    # without --skip-existing or --overwrite nothing is replaced
    assert main(["preprocess", str(photos / "ball.jpg"), "--no-rembg"]) == 2
    assert "already exists" in _error_line(capsys)


def test_missing_rembg_is_one_line_and_auto_falls_back(tmp_path: Path, capsys, monkeypatch):
    from PIL import Image, ImageDraw

    monkeypatch.setitem(sys.modules, "rembg", None)  # import rembg fails, as when it is not installed
    photo = tmp_path / "ball.jpg"
    image = Image.new("RGB", (100, 100), "white")
    ImageDraw.Draw(image).ellipse((30, 30, 70, 70), fill=(20, 90, 20))
    image.save(photo)
    out = tmp_path / "out"
    assert main(["preprocess", str(photo), "--rembg", "-o", str(out)]) == 2
    err = _error_line(capsys)
    assert "rembg" in err and "--no-rembg" in err
    assert not out.exists() or not any(out.iterdir())
    with monkeypatch.context() as m:
        _no_model_load(m)
        assert main(["image2gs", str(photo), "--teacher", "reference", "--model", str(SPOT), "--rembg",
                     "-o", str(out)]) == 2
    assert "rembg" in _error_line(capsys)
    assert main(["preprocess", str(photo), "-o", str(out), "-q"]) == 0  # auto: the uniform background
    assert (out / "ball_rgba.png").is_file()


def test_presets_list_and_show_round_trip(tmp_path: Path, capsys):
    import tomllib

    from microdreamer.config import resolve
    from microdreamer.teachers.registry import TEACHERS

    assert main(["presets", "list", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert {entry.preset for entry in TEACHERS.values()} <= set(listed)  # every teacher has its preset
    assert listed["stable-zero123"]["teacher"] == "stable-zero123" and listed["reference"]["about"]
    for name in ("reference", "stable-zero123"):
        assert main(["presets", "show", name]) == 0
        shown = tmp_path / f"{name}.toml"
        shown.write_text(capsys.readouterr().out)
        assert tomllib.loads(shown.read_text())["teacher"]["name"] == name
        assert resolve(name, shown) == resolve(name)
    assert main(["presets", "show", "nope"]) == 2
    assert "unknown preset 'nope'" in _error_line(capsys)


def test_models_list_and_download_from_a_cache(tmp_path: Path, capsys, monkeypatch):
    import huggingface_hub.constants

    from test_loading import _fake_cache
    from tiny_models import build_tiny_zero123

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = tmp_path / "hub"
    snapshot = _fake_cache(hub, build_tiny_zero123(tmp_path / "model"), "ashawkey/stable-zero123-diffusers")
    size = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())
    assert main(["models", "list", "--cache-dir", str(hub), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["stable-zero123"]["cached"] is True and rows["stable-zero123"]["size_bytes"] == size
    assert rows["stable-zero123"]["commercial_use"] is False
    assert rows["zero123-xl"]["cached"] is False and rows["zero123-xl"]["size_bytes"] is None
    assert main(["models", "list", "--cache-dir", str(hub)]) == 0
    assert "non-commercial only" in capsys.readouterr().out
    assert main(["models", "download", "stable-zero123", "--cache-dir", str(hub)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(snapshot) and "Non-Commercial" in captured.err
    assert main(["models", "download", "nope"]) == 2
    assert "unknown model 'nope'" in _error_line(capsys)
    # offline and not cached: the advice fits the command being run (not "run `models download`")
    assert main(["models", "download", "zero123-xl", "--cache-dir", str(hub)]) == 2
    fetching, error = capsys.readouterr().err.splitlines()
    assert fetching == "fetching ashawkey/zero123-xl-diffusers (about 2.5 GB)"
    assert error.startswith("error: cannot download model 'ashawkey/zero123-xl-diffusers' (")
    assert "HF_HUB_OFFLINE is not set" in error and "models download" not in error


def test_peak_memory_covers_what_the_process_holds_now():
    import os

    import torch

    from microdreamer.pipeline import peak_memory

    held = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    with open("/proc/self/statm") as f:
        resident_gib = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    peak = peak_memory(torch.device("cpu"))
    assert set(peak) == {"process_rss_gib"}
    assert peak["process_rss_gib"] >= resident_gib - 1e-3 and held.sum() > 0


# piped output: logs, CI, schedulers ---------------------------------------------------------------


def _plain_lines(err: str, allowed: list[str]) -> list[str]:
    """The lines of ``err``, each checked to be whole: one of the ``allowed`` patterns from start to end (a
    line wrapped in the middle of a phrase would leave a fragment that matches none)."""
    lines = err.splitlines()
    strays = [line for line in lines if not any(re.fullmatch(pattern, line) for pattern in allowed)]
    assert not strays, strays
    return lines


ITERATION = r"\S+ \[\d+/\d+\] SIR (init \(from noise\)|t2=\d+ t1=\d+) loss=\d+, \d+\.\d s"
RESULT = r"\d+ Gaussians, \d+\.\d s SIR, \d+ network evaluations"


@pytest.mark.slow
def test_piped_progress_is_plain_whole_lines_and_the_summary_is_not_cut(tmp_path: Path, capsys, cow_pngs,
                                                                         micro_config):
    from microdreamer.wording import shorten

    folder = tmp_path / "photos"
    folder.mkdir()
    long = "a_photo_whose_name_is_long_enough_to_be_shortened_in_progress_lines_and_in_the_summary"
    shutil.copy(cow_pngs[0], folder / f"{long}.png")
    shutil.copy(cow_pngs[1], folder / "b.png")
    out = tmp_path / "out"
    assert main(["image2gs", str(folder), "--teacher", "reference", "--model", str(SPOT), "--config",
                 str(micro_config), "--out", str(out)]) == 0  # capsys: stderr is not a terminal, as in a log
    first, second = shorten(str(folder / f"{long}.png")), shorten(str(folder / "b.png"))
    lines = _plain_lines(capsys.readouterr().err, [
        r"\[[12]/2\] .+", r"\S+: loading the teacher", r"\S+: teacher loaded in \d+\.\d s", ITERATION,
        rf"done .+: {RESULT}", r"image2gs: 2 inputs", r"[┏┡└].*[┓┩┘]", r"[┃│] .* [┃│]",
        rf"2 done; manifest: {out / 'manifest.json'}",
    ])
    assert lines[0] == f"[1/2] {first}" and f"[2/2] {second}" in lines and len(first) == 60
    assert sum(bool(re.fullmatch(ITERATION, line)) for line in lines) == 4  # 2 inputs × (init + 1)
    rows = [line for line in lines if line.startswith("│")]
    assert len(rows) == 2 and all(" done " in row and "network evaluations" in row for row in rows)
    assert first in rows[0] and second in rows[1]  # the cells hold the whole (shortened) input


@pytest.mark.slow
def test_selftest_prints_its_progress_when_piped(capsys, monkeypatch, micro_config):
    from microdreamer import api
    from microdreamer.config import resolve

    # the bundled run, made tiny: the same command path with a micro schedule (resolved in the API)
    monkeypatch.setattr(api, "resolve_config", lambda *args, **flags: resolve(
        "reference", micro_config, {"teacher": {"model": flags["model"]}, "device": flags["device"]}))
    assert main(["selftest", "--min-psnr", "0"]) == 0
    lines = _plain_lines(capsys.readouterr().err, [
        r"selftest: the Spot cow from its front view with the reference teacher on cpu \(.*\)",
        r"spot: loading the teacher", r"spot: teacher loaded in \d+\.\d s", ITERATION,
        r"spot: scoring 16 held-out views",
        r"PASS selftest \(lit teacher\): mean held-out PSNR \d+\.\d\d dB \(threshold 0\.0\), SSIM \d\.\d+, \d+\.\d s SIR on cpu, "
        r"\d+ Gaussians?",
    ])
    assert len(lines) == 7 and lines[-1].startswith("PASS")


def test_text2gs_with_the_default_model_offline_is_one_line(tmp_path: Path, capsys, monkeypatch):
    """The prompt check before loading looks the default model up too (it once named an unimported helper)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["text2gs", "a corgi", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and "mvdream" in error
