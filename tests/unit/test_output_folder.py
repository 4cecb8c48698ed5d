"""Output folders the user names: refused clearly before any work, nothing in them removed."""

from __future__ import annotations

from pathlib import Path

import pytest

from circuitscan.schemas.errors import UserInputError
from circuitscan.services.output_folder import OutputFolderError, output_folder, writing_into


def test_a_folder_that_cannot_be_made_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"cannot write the report to .*notes.txt: it is a"):
        output_folder(tmp_path / "notes.txt", "the report")
    with pytest.raises(OutputFolderError, match=r"notes.txt/r: Not a directory"):
        output_folder(tmp_path / "notes.txt" / "r", "the report")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert issubclass(OutputFolderError, UserInputError)


def test_an_existing_folder_keeps_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert output_folder(tmp_path / "out" / "a" / "b", "x").is_dir()
    assert output_folder(tmp_path / "out", "x") == tmp_path / "out"
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_failed_write_inside_is_named_and_others_pass_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "out"
    refused = pytest.raises(OutputFolderError, match=r"export to .*out/sub/page.html: Not a dir")
    with refused, writing_into(out, "the export"):
        (out / "sub").write_text("a file where the export wants a folder")
        (out / "sub" / "page.html").write_text("<html>")
    # A path outside the output folder is not the user's: its error passes unchanged.
    with pytest.raises(FileNotFoundError), writing_into(out, "the export"):
        (tmp_path / "elsewhere.bin").read_bytes()


def test_the_api_refuses_a_store_root_it_cannot_make(tmp_path: Path) -> None:
    from circuitscan.services.api.store_roots import store_root

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"cannot write stores to .*notes.txt/stores"):
        store_root(tmp_path / "notes.txt" / "stores")
    assert store_root(tmp_path / "stores").path == (tmp_path / "stores").resolve()
