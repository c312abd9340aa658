"""``eval --protocol clip``, MicroDreamer's CLIP similarity: a tiny CLIP built from the transformers classes, saved in
the Hugging Face layout and loaded back through the product's path, checked against hand computations and against
transformers' own loading; the protocol on a saved Gaussian run, a mesh and a prompt; the refusals."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microdreamer.cli import main
from microdreamer.errors import UserError
from microdreamer.metrics_clip import cosine, find_clip, load_clip
from tiny_models import CLIP_IMAGE, CLIP_MEAN, CLIP_STD, build_tiny_clip

SPOT = Path(__file__).resolve().parents[1] / "microdreamer" / "assets" / "spot" / "spot.obj"
AZIMUTHS = [45.0 * i for i in range(8)]
#: a tiny reference-teacher run, framed by its own reference view (distance 2.4, fovy 40) to show eval reads it
RUN_CONFIG = (
    "[schedule]\niterations = 1\nsteps = 1\ninit_steps = 1\ndenoise_steps = 4\n"
    "[cameras]\nviews = 1\nresolution = 32\nradius = 2.4\nfovy = 40.0\n[gaussians]\nnum_points = 100\n"
)
#: |1 − x·x| for a unit float32 vector x of D = 32 entries: at most D roundings of 2⁻²⁴ in the norm, D in the dot
UNIT_EPS = 2 * 32 * 2.0**-24
#: the same embeddings reached by two code paths (ours, transformers' from_pretrained): float32 sums over ≤ 64 terms
#: of magnitude ≤ ~3 (normalised pixels), so a few hundred ulps of 1
SAME_PATH_ATOL = 1e-5


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def reference(clip_dir):
    """transformers' own loading of the same folder, independent of ours."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    return (CLIPModel.from_pretrained(str(clip_dir)).eval(), CLIPImageProcessorPil.from_pretrained(str(clip_dir)),
            CLIPTokenizer.from_pretrained(str(clip_dir)))


def _features(output) -> torch.Tensor:
    features = output if isinstance(output, torch.Tensor) else output.pooler_output  # transformers 4 / 5
    return features / features.norm(dim=-1, keepdim=True)


@torch.no_grad()
def reference_image_embeddings(reference, images: np.ndarray) -> torch.Tensor:
    model, processor, _ = reference
    pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    return _features(model.get_image_features(pixel_values=torch.as_tensor(np.asarray(pixels))))


@torch.no_grad()
def reference_text_embedding(reference, prompt: str) -> torch.Tensor:
    model, _, tokenizer = reference
    tokens = tokenizer([prompt], padding=True, return_tensors="pt")
    return _features(model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))


def over_white(rgba: np.ndarray) -> np.ndarray:
    a = rgba[..., 3:].astype(np.float64) / 255.0
    return np.floor(rgba[..., :3] * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """Renders ``[B,3,H,W]`` in [0, 1] → ``uint8 [B,H,W,3]``, rounded half up."""
    return torch.floor(rgb.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_the_tiny_clip_has_the_published_layout_and_loads_through_find_clip(clip_dir):
    names = {p.name for p in clip_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt"} <= names
    assert json.loads((clip_dir / "config.json").read_text())["architectures"] == ["CLIPModel"]
    assert find_clip(clip_dir, text=True, allow_download=False) == clip_dir


def test_images_are_preprocessed_as_by_hand_shortest_edge_bicubic_centre_crop_openai_normalisation(clip_dir):
    """A 168×112 image: the shortest edge 112 → 224 makes it 336×224 (PIL bicubic), the centre crop keeps
    columns 56..279, then (v/255 − mean)/std per channel."""
    clip = load_clip(clip_dir, "cpu", text=False)
    image = np.random.default_rng(0).integers(0, 256, (112, 168, 3), dtype=np.uint8)
    image[40:72, 60:80] = (250, 20, 100)  # a block: resized rows 80..143, columns 120..159 → cropped 64..103
    pixels = clip.pixel_values(image[None])[0].double()
    assert pixels.shape == (3, CLIP_IMAGE, CLIP_IMAGE)

    resized = np.asarray(Image.fromarray(image).resize((336, 224), Image.BICUBIC), dtype=np.float64)
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    by_hand = (resized[:, 56:280] / 255.0 - mean) / std
    # float32 normalisation of values ≤ |(0 − 0.49)/0.26| ≈ 1.9 … 2.2: a few ulps
    assert np.abs(pixels.permute(1, 2, 0).numpy() - by_hand).max() < 1e-6
    # the block's inside (4 pixels from its edges, beyond the bicubic kernel's reach) is its colour exactly
    block = (np.array([250, 20, 100]) / 255.0 - mean) / std
    inside = pixels[:, 84:140, 68:100].permute(1, 2, 0).numpy()
    assert np.abs(inside - block).max() < 1e-6


def test_identical_images_score_one_and_different_images_less(clip_dir):
    clip = load_clip(clip_dir, "cpu", text=False)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    embedded = clip.image_embeddings(np.stack([a, a, b]))
    similarity = cosine(embedded, embedded[:1])
    assert similarity[:2].tolist() == pytest.approx([1.0, 1.0], abs=UNIT_EPS)
    assert similarity[2] < 1.0 - 1e-4


@pytest.mark.parametrize("shards", [None, "20KB"], ids=["one file", "sharded"])
def test_our_loading_gives_transformers_own_embeddings(tmp_path, clip_dir, reference, shards):
    """Config → CLIPModel → strict safetensors load (one file, or the shards an index names) embeds as
    ``CLIPModel.from_pretrained`` does; the prompt is tokenised from the folder's vocab.json and merges.txt."""
    folder = clip_dir if shards is None else build_tiny_clip(tmp_path / "sharded", shard_size=shards)
    if shards is not None:
        assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    clip = load_clip(folder, "cpu", text=True)
    images = np.random.default_rng(2).integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    assert torch.allclose(clip.image_embeddings(images), reference_image_embeddings(reference, images),
                          atol=SAME_PATH_ATOL, rtol=0)
    assert torch.allclose(clip.text_embedding("the cat"), reference_text_embedding(reference, "the cat"),
                          atol=SAME_PATH_ATOL, rtol=0)
    vocab = json.loads((folder / "vocab.json").read_text())
    ids = clip.tokenizer("the cat").input_ids  # "the</w>" and "cat</w>" are merges of the tiny vocabulary
    assert ids == [vocab["<|startoftext|>"], vocab["the</w>"], vocab["cat</w>"], vocab["<|endoftext|>"]]


@pytest.fixture(scope="module")
def cat_run(tmp_path_factory, one_thread) -> Path:
    """A tiny reference-teacher run from an RGBA image: run/cat.ply, cat.json, cat_rgba.png."""
    root = tmp_path_factory.mktemp("run")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[12:52, 20:44] = (200, 70, 40, 255)
    Image.fromarray(rgba).save(root / "cat.png")
    (root / "run.toml").write_text(RUN_CONFIG)
    argv = ["image2gs", str(root / "cat.png"), "--teacher", "reference", "--model", str(SPOT),
            "--config", str(root / "run.toml"), "--out", str(root / "run"), "-q"]
    assert main(argv) == 0
    return root / "run"


def _views(render, radius: float, fovy: float, resolution: int) -> np.ndarray:
    from microdreamer.sir.cameras import Cameras

    cameras = Cameras.orbit(torch.zeros(8), torch.tensor(AZIMUTHS), radius, resolution, fovy)
    with torch.no_grad():
        return to_uint8(render(cameras, torch.ones(3)).rgb)


def test_cli_scores_a_gaussian_run_as_the_mean_of_independently_computed_view_cosines(
        cat_run, clip_dir, reference, tmp_path, capsys):
    from microdreamer.config import GaussianConfig
    from microdreamer.representations.gaussians import Gaussians

    scores = tmp_path / "clip.json"
    argv = ["eval", str(cat_run / "cat.ply"), "--protocol", "clip", "--clip-model", str(clip_dir), "--res", "48",
            "--device", "cpu"]
    assert main([*argv, "--json", str(scores)]) == 0
    table = capsys.readouterr().out
    assert "cat.ply vs cat_rgba.png (CLIP)" in table and "mean" in table
    data = json.loads(scores.read_text())
    assert (data["protocol"], data["model"], data["compared_with"]) == ("clip", str(clip_dir), "image")
    assert data["image"] == str(cat_run / "cat_rgba.png") and data["prompt"] is None
    assert (data["radius"], data["fovy"], data["resolution"]) == (2.4, 40.0, 48)  # the run's reference view
    assert [v["azimuth"] for v in data["views"]] == AZIMUTHS and {v["elevation"] for v in data["views"]} == {0.0}

    gaussians = Gaussians.load(cat_run / "cat.ply", GaussianConfig(), torch.device("cpu"))
    views = _views(gaussians.render, 2.4, 40.0, 48)
    target = over_white(np.asarray(Image.open(cat_run / "cat_rgba.png").convert("RGBA")))
    expected = cosine(reference_image_embeddings(reference, views), reference_image_embeddings(reference, target[None]))
    assert [v["similarity"] for v in data["views"]] == pytest.approx(expected.tolist(), abs=SAME_PATH_ATOL)
    assert data["similarity"] == pytest.approx(float(expected.mean()), abs=SAME_PATH_ATOL)
    assert data["similarity"] == pytest.approx(sum(v["similarity"] for v in data["views"]) / 8, abs=1e-12)

    # the same run against a prompt: the text embedding instead
    assert main([*argv, "--prompt", "the cat", "--json", str(tmp_path / "text.json")]) == 0
    text = json.loads((tmp_path / "text.json").read_text())
    assert (text["compared_with"], text["prompt"], text["image"]) == ("prompt", "the cat", None)
    expected = cosine(reference_image_embeddings(reference, views), reference_text_embedding(reference, "the cat"))
    assert [v["similarity"] for v in text["views"]] == pytest.approx(expected.tolist(), abs=SAME_PATH_ATOL)

    # never overwrite silently
    assert main([*argv, "--json", str(scores)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_text_run_is_compared_with_the_prompt_its_report_names(cat_run, clip_dir, reference, tmp_path):
    from microdreamer.api import evaluate_clip

    shutil.copy(cat_run / "cat.ply", tmp_path / "corgi.ply")
    report = json.loads((cat_run / "cat.json").read_text())
    report.update(input=None, prompt="the cat", stem="corgi")
    (tmp_path / "corgi.json").write_text(json.dumps(report))
    scores = evaluate_clip(tmp_path / "corgi.ply", clip_dir, device="cpu", resolution=32)
    assert scores.target.prompt == "the cat" and scores.to_dict()["compared_with"] == "prompt"
    from microdreamer.config import GaussianConfig
    from microdreamer.representations.gaussians import Gaussians

    views = _views(Gaussians.load(tmp_path / "corgi.ply", GaussianConfig(), torch.device("cpu")).render, 2.4, 40.0, 32)
    expected = cosine(reference_image_embeddings(reference, views), reference_text_embedding(reference, "the cat"))
    assert [v.similarity for v in scores.views] == pytest.approx(expected.tolist(), abs=SAME_PATH_ATOL)


def test_an_exported_mesh_is_scored_in_its_run_frame_from_its_runs_reference_view(clip_dir, reference, tmp_path):
    """A mesh whose export report says the file is the run's frame scaled by 2 is rendered shrunk back by 2,
    unlit, from the run report's distance and fovy; compared with --image."""
    from microdreamer.api import evaluate_clip
    from microdreamer.io.mesh import load_mesh
    from microdreamer.render.mesh import rasterize_mesh

    shutil.copy(SPOT, tmp_path / "cow.obj")
    for name in ("spot.mtl", "spot_texture.png"):  # the material cow.obj names
        shutil.copy(SPOT.parent / name, tmp_path / name)
    frame = {"center": [0.0, 0.0, 0.0], "size": 1.0, "scale": 2.0, "up": "y"}
    (tmp_path / "cow_mesh.json").write_text(json.dumps({"outputs": [str(tmp_path / "cow.obj")], "frame": frame}))
    (tmp_path / "cow.json").write_text(json.dumps({"config": {"cameras": {"radius": 1.5, "fovy": 45.0}}}))
    photo = np.full((40, 30, 3), 90, np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")

    scores = evaluate_clip(tmp_path / "cow.obj", clip_dir, image=tmp_path / "photo.png", device="cpu", resolution=32)
    assert (scores.radius, scores.fovy) == (1.5, 45.0)
    mesh = load_mesh(tmp_path / "cow.obj", normalize=False)
    mesh.vertices = mesh.vertices / 2.0
    views = _views(lambda cams, bg: rasterize_mesh(mesh, cams, bg, supersample=2), 1.5, 45.0, 32)
    expected = cosine(reference_image_embeddings(reference, views), reference_image_embeddings(reference, photo[None]))
    assert [v.similarity for v in scores.views] == pytest.approx(expected.tolist(), abs=SAME_PATH_ATOL)


def _folder(tmp_path: Path, clip_dir: Path, drop: tuple[str, ...] = (), **files: str) -> Path:
    """A copy of the tiny CLIP without ``drop``, with ``files`` (name → text) written over it."""
    folder = tmp_path / "model"
    shutil.copytree(clip_dir, folder, ignore=shutil.ignore_patterns(*drop))
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


@pytest.mark.parametrize("drop, files, text, message", [
    (("config.json",), {}, False, "has no config.json"),
    ((), {"config__json": '{"model_type": "bert"}'}, False, "holds a 'bert' model, not CLIP"),
    (("model.safetensors",), {"pytorch_model__bin": "pickle"}, False, "only .safetensors weights are loaded"),
    (("vocab.json", "merges.txt"), {}, True, "has no tokenizer (vocab.json and merges.txt, or tokenizer.json)"),
    (("preprocessor_config.json",), {}, False, "has no preprocessor_config.json"),
], ids=["no config", "not clip", "pickles only", "no tokenizer", "no preprocessor"])
def test_a_folder_that_is_not_a_usable_clip_checkpoint_is_one_line(tmp_path, clip_dir, drop, files, text, message):
    folder = _folder(tmp_path, clip_dir, drop, **files)
    with pytest.raises(UserError) as error:
        find_clip(folder, text=text, allow_download=False)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_sharded_checkpoint_missing_a_shard_names_it(tmp_path):
    folder = build_tiny_clip(tmp_path / "sharded", shard_size="20KB")
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    (folder / shards[-1]).unlink()
    with pytest.raises(UserError, match=f"names the shard {shards[-1]}, which is missing"):
        load_clip(folder, "cpu", text=False)


def test_a_processor_of_another_checkpoint_is_refused_when_loading(tmp_path, clip_dir):
    config = json.loads((clip_dir / "preprocessor_config.json").read_text())
    bigger = json.dumps({**config, "crop_size": 336, "size": 336})
    folder = _folder(tmp_path, clip_dir, preprocessor_config__json=bigger)
    with pytest.raises(UserError, match="crops 336x336 but the model reads 224x224"):
        load_clip(folder, "cpu", text=False)


def test_an_uncached_hub_id_without_downloads_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="not in the Hugging Face cache and downloads are disabled; download a CLIP"):
        find_clip("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", text=False, allow_download=False, cache_dir=tmp_path)


def test_cli_refuses_a_non_clip_folder_and_a_run_without_a_target_before_loading(cat_run, tmp_path, capsys,
                                                                                  monkeypatch):
    from microdreamer import metrics_clip, video

    def refuse(*args, **kwargs):
        raise AssertionError("loaded before refusing")

    monkeypatch.setattr(metrics_clip.ClipSimilarity, "load", refuse)
    monkeypatch.setattr(video, "result_renderer", refuse)
    (tmp_path / "notclip").mkdir()
    (tmp_path / "notclip" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "notclip" / "preprocessor_config.json").write_text("{}")
    ply = str(cat_run / "cat.ply")
    shutil.copy(cat_run / "cat.ply", tmp_path / "lone.ply")
    for argv, message in [
        (["eval", ply, "--protocol", "clip", "--clip-model", str(tmp_path / "notclip")], "not CLIP"),
        (["eval", str(tmp_path / "lone.ply"), "--protocol", "clip", "--clip-model", str(tmp_path / "notclip")],
         "nothing to compare lone.ply with (no run report beside lone.ply): pass --image IMAGE or --prompt TEXT"),
        (["eval", ply, "--protocol", "clip", "--clip-model", str(tmp_path / "notclip"), "--image", "a.png", "--prompt",
          "x"], "not both"),
    ]:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, captured.err


def test_the_api_scores_a_result_in_memory_as_eval_scores_it_saved(cat_run, clip_dir, tmp_path):
    """The same run again through the API (its report reproduces it): the in-memory result scores as its saved
    files do, against its preprocessed input."""
    from microdreamer import Pipeline
    from microdreamer.api import evaluate_clip

    result = Pipeline.from_config(cat_run / "cat.json").image_to_3d(cat_run.parent / "cat.png")
    in_memory = result.evaluate_clip(clip_dir, resolution=32)
    saved = evaluate_clip(cat_run / "cat.ply", clip_dir, device="cpu", resolution=32)
    assert (in_memory.radius, in_memory.fovy) == (saved.radius, saved.fovy) == (2.4, 40.0)
    assert in_memory.to_dict()["image"] == "cat_rgba.png"
    assert [v.similarity for v in in_memory.views] == pytest.approx([v.similarity for v in saved.views],
                                                                    abs=SAME_PATH_ATOL)
    with pytest.raises(UserError, match="not both"):
        result.evaluate_clip(clip_dir, image=cat_run / "cat_rgba.png", prompt="the cat")
