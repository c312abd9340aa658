"""File references of run reports: found beside the run folder first, then where they were, checked by hash."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from microdreamer.config import resolve
from microdreamer.errors import UserError
from microdreamer.io.provenance import FileRef, content_hash, record_path


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_file_is_named_relative_absolute_and_by_its_bytes(tmp_path):
    image = _file(tmp_path / "photos" / "cat.png", b"cat pixels")
    ref = FileRef.record(image, tmp_path / "runs" / "a")
    assert ref.relative == "../../photos/cat.png" and ref.absolute == str(image.resolve())
    assert ref.sha256 == hashlib.sha256(b"cat pixels").hexdigest()
    assert FileRef.from_json(json.loads(json.dumps(ref.to_dict()))) == ref


def test_resolution_tries_the_relative_path_then_the_absolute_one(tmp_path):
    image = _file(tmp_path / "project" / "cat.png", b"cat")
    run = tmp_path / "project" / "run"
    ref = FileRef.record(image, run)
    assert ref.resolve(run, "the image", "pass it") == image
    # the project moved: the old absolute path is gone, the relative one still holds
    shutil.move(tmp_path / "project", tmp_path / "moved")
    assert ref.resolve(tmp_path / "moved" / "run", "the image", "pass it") == tmp_path / "moved" / "cat.png"
    # only the run folder moved: the relative path leads nowhere, the absolute one holds
    _file(tmp_path / "project" / "cat.png", b"cat")
    assert ref.resolve(tmp_path / "elsewhere" / "run", "the image", "pass it") == tmp_path / "project" / "cat.png"
    # a file with other bytes at the relative path is passed over for the one that matches
    _file(tmp_path / "elsewhere" / "cat.png", b"dog")
    assert ref.resolve(tmp_path / "elsewhere" / "run", "the image", "pass it") == tmp_path / "project" / "cat.png"


def test_a_changed_or_missing_file_is_one_line_naming_it_and_the_fix(tmp_path):
    image = _file(tmp_path / "cat.png", b"cat")
    ref = FileRef.record(image, tmp_path / "run")
    image.write_bytes(b"another cat")
    with pytest.raises(UserError) as changed:
        ref.resolve(tmp_path / "run", "the run's input image", "pass --image IMAGE")
    assert str(changed.value) == (f"the run's input image {image} has changed since the run (its content hash "
                                  "differs): pass --image IMAGE")
    image.unlink()
    with pytest.raises(UserError) as gone:
        ref.resolve(tmp_path / "run", "the run's input image", "pass --image IMAGE")
    assert str(gone.value) == f"the run's input image cat.png is gone (not at {image}): pass --image IMAGE"
    # the relative and the absolute path are both named when they differ
    with pytest.raises(UserError, match=f"not at {tmp_path / 'moved' / 'cat.png'} nor at {image}"):
        ref.resolve(tmp_path / "moved" / "run", "the run's input image", "pass --image IMAGE")


def test_a_plain_path_of_an_older_report_is_taken_without_a_hash(tmp_path):
    image = _file(tmp_path / "cat.png", b"cat")
    ref = FileRef.from_json(str(image))
    assert ref == FileRef(None, str(image), None) and ref.resolve(tmp_path / "x", "the image", "pass it") == image
    with pytest.raises(UserError, match="expected a path or"):
        FileRef.from_json(42)


def test_a_folder_is_hashed_by_its_listing_and_its_json_files(tmp_path):
    model = tmp_path / "model"
    index = _file(model / "model_index.json", b'{"unet": ["diffusers", "UNet2DConditionModel"]}')
    weights = _file(model / "unet" / "diffusion_pytorch_model.safetensors", b"\x00" * 64)
    _file(model / ".cache" / "huggingface" / "download.lock", b"")
    first = content_hash(model)
    lines = (f"model_index.json\t{index.stat().st_size}\n".encode() + index.read_bytes()
             + b"unet/diffusion_pytorch_model.safetensors\t64\n")
    assert first == hashlib.sha256(lines).hexdigest()  # hidden entries (download caches) are left out
    weights.write_bytes(b"\x01" * 64)  # weights are known by name and size, not read
    assert content_hash(model) == first
    weights.write_bytes(b"\x01" * 65)
    assert content_hash(model) != first
    weights.write_bytes(b"\x00" * 64)
    index.write_text('{"unet": ["diffusers", "UNet2DConditionModeX"]}')
    assert content_hash(model) != first


def test_models_are_recorded_as_references_only_when_they_are_local(tmp_path):
    mesh = _file(tmp_path / "cow.obj", b"v 0 0 0\n")
    assert record_path(str(mesh), tmp_path / "run") == FileRef.record(mesh, tmp_path / "run").to_dict()
    assert record_path("ashawkey/stable-zero123-diffusers", tmp_path) == "ashawkey/stable-zero123-diffusers"
    assert record_path(None, tmp_path) is None


def test_a_saved_config_finds_its_model_unless_the_flags_replace_it(tmp_path):
    mesh = _file(tmp_path / "assets" / "cow.obj", b"v 0 0 0\n")
    run = tmp_path / "run"
    report = _file(run / "cow.json", json.dumps({"config": {
        "teacher": {"name": "reference", "model": FileRef.record(mesh, run).to_dict()}}}).encode())
    assert resolve("reference", report).teacher.model == str(mesh)
    shutil.move(tmp_path / "assets", run / "assets")  # the relative path breaks, the absolute one holds...
    _file(tmp_path / "assets" / "cow.obj", b"v 0 0 0\n")
    assert resolve("reference", report).teacher.model == str(mesh)
    shutil.rmtree(tmp_path / "assets")  # ... until it is gone
    with pytest.raises(UserError, match=r"^the run's model cow.obj is gone \(not at .*\): pass --model$"):
        resolve("reference", report)
    assert resolve("reference", report, {"teacher": {"model": "other.obj"}}).teacher.model == "other.obj"
    assert resolve("reference", report, needs_teacher=False).teacher.model is None
    other = resolve("stable-zero123", report, {"teacher": {"name": "stable-zero123"}})
    assert other.teacher.model == resolve("stable-zero123").teacher.model  # the mesh is no model of another teacher
