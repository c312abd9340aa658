"""Output files: folders checked before any work, files published whole, one temporary name per file."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from microdreamer.errors import UserError
from microdreamer.io.atomic import atomic_path, check_output_dir, check_output_file
from microdreamer.io.images import save_image
from microdreamer.wording import plural, shorten


def test_files_written_together_keep_one_temporary_name_each(tmp_path: Path):
    """An atomic writer handed the temporary path of an enclosing atomic_path writes into it (no
    '..x.partial-PID.partial-PID.png'), and nothing appears before the enclosing block completes."""
    target = tmp_path / "out" / "sheet.png"
    with atomic_path(target) as tmp:
        with atomic_path(tmp, overwrite=False) as inner:
            assert inner == tmp
        assert save_image(tmp, np.zeros((2, 3, 3), np.uint8)) == tmp
        assert os.listdir(tmp.parent) == [f".sheet.partial-{os.getpid()}.png"]
    assert os.listdir(target.parent) == ["sheet.png"] and np.asarray(Image.open(target)).shape == (2, 3, 3)

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out" / "late.png") as tmp:
        save_image(tmp, np.zeros((2, 2, 3), np.uint8))
        raise RuntimeError("a later output failed")
    assert os.listdir(target.parent) == ["sheet.png"]  # the nested write is removed with its block


def test_output_folders_are_checked_without_writing_anything(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("a file")
    check_output_dir(tmp_path / "new" / "deeper")  # made later, by the first write
    check_output_file(tmp_path / "new" / "scores.json", "--json")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    with pytest.raises(UserError, match=r"^--out .*notes.txt is a file, not a folder; choose a folder$"):
        check_output_dir(tmp_path / "notes.txt")
    with pytest.raises(UserError, match=r"^--out .*notes.txt/sub cannot be written: .*notes.txt is a file"):
        check_output_dir(tmp_path / "notes.txt" / "sub")
    with pytest.raises(UserError, match=r"^--json .* is a folder; give a file name$"):
        check_output_file(tmp_path, "--json")


def test_an_unwritable_folder_is_refused_by_what_fails_not_by_mode_bits(tmp_path: Path, monkeypatch):
    """Root ignores mode bits, a read-only mount or an immutable folder does not: the probe file decides."""
    import tempfile

    def read_only(*args, dir=None, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match=r"^--out .*/a/b: cannot write in .* \(Read-only file system\); choose another folder$"):
        check_output_dir(tmp_path / "a" / "b")
    monkeypatch.undo()
    os.chmod(tmp_path, 0o555)  # mode bits alone: refused for a normal user, fine for root
    try:
        writable = os.access(tmp_path, os.W_OK)
        if writable:
            check_output_dir(tmp_path)
        else:
            with pytest.raises(UserError, match="Permission denied"):
                check_output_dir(tmp_path)
    finally:
        os.chmod(tmp_path, 0o755)
    assert os.listdir(tmp_path) == []


def test_counts_and_long_inputs_are_worded_for_one_line():
    assert [plural(n, "input") for n in (0, 1, 2)] == ["0 inputs", "1 input", "2 inputs"]
    assert plural(1, "Gaussian") == "1 Gaussian" and plural(3, "fps", "fps") == "3 fps"
    prompt = "a highly detailed photograph of a small red cat sitting on a wooden table next to a cup of coffee"
    short = shorten(prompt, 40)
    assert len(short) <= 40 and short.startswith("a highly detailed") and short.endswith("cup of coffee")
    assert "…" in short and shorten("a  short\nprompt", 40) == "a short prompt"
