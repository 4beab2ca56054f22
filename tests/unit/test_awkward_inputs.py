"""Awkward folders: links that dangle or loop, unreadable and non-UTF-8 folders, flat, empty and mixed folders.

Each problem is a DatasetError naming the path, or an entry of ``dataset.skipped`` with its reason; nothing
raises anything else, nothing hangs, and nothing is dropped without a word.
"""

import errno
import os
import struct
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from cliplab.data import has_labels, image_files, image_folder, load_dataset, parse_labels
from cliplab.data.prompts import check_class_names
from cliplab.errors import DatasetError, ImageDecodeError, LabelError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="symlinks and byte file names are POSIX cases")

CAFE = os.fsdecode(b"caf\xe9")  # the OS's text for a name that is not UTF-8: "caf\udce9"


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (9, 9, 9)).save(path)
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height (a decompression bomb) and holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _unreadable(monkeypatch, *folders: Path) -> None:
    """Listing any of ``folders`` fails as it would without read permission (tests run as root)."""
    real = os.scandir
    blocked = {os.fspath(f) for f in folders}

    def scandir(path="."):
        if os.fspath(path) in blocked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def _bytes_dir(parent: Path, name: bytes) -> Path:
    try:
        os.mkdir(os.fsencode(parent) + b"/" + name)
    except OSError as exc:  # e.g. a file system that insists on UTF-8 names
        pytest.skip(f"cannot create a non-UTF-8 folder name here: {exc}")
    return parent / os.fsdecode(name)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """labelled/: class folders holding every awkward case; outside/: targets of links."""
    outside = tmp_path / "outside"
    _img(outside / "real.png")
    _img(outside / "dir" / "e.png")
    root = tmp_path / "labelled"
    cat = root / "cat"
    _img(cat / "a.png")
    (cat / "notes.txt").write_text("not an image")
    (cat / "empty.png").write_bytes(b"")
    _png_header(cat / "bomb.png", 100_000, 100_000)
    (cat / "dangling.png").symlink_to(tmp_path / "missing.png")
    (cat / "here").symlink_to(".")  # loops back to cat/
    (cat / "up").symlink_to("..")  # loops back to the dataset root
    (cat / "self").symlink_to("self")  # a link to itself: ELOOP
    (cat / "linked.png").symlink_to(outside / "real.png")  # a link to a file: an image like any other
    (cat / "sub").symlink_to(outside / "dir")  # a link to a folder: followed
    (cat / "twice").symlink_to(outside / "dir")  # the same folder again: scanned once
    os.mkfifo(cat / "pipe.png")  # opening it would block: never an item
    _img(root / "dog" / "b.png")
    _img(root / "locked" / "c.png")
    _img(_bytes_dir(root, b"caf\xe9") / "d.png")
    (root / "README.txt").write_text("about this dataset")
    _unreadable(monkeypatch, root / "locked")
    return root


def _skips(dataset, root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): reason for path, reason in dataset.skipped}


@pytest.mark.timeout(60)
def test_class_folders_list_every_awkward_entry_with_its_reason(corpus):
    data = load_dataset(corpus)
    assert data.class_names == ["caf\\xe9", "cat", "dog", "locked"]  # the folder's byte 0xe9 as \xe9
    assert all(name.encode("utf-8") for name in data.class_names) and check_class_names(data.class_names, "x")
    assert data.item_ids() == ["caf\\xe9/d.png", "cat/a.png", "cat/bomb.png", "cat/empty.png", "cat/linked.png",
                               "cat/sub/e.png", "dog/b.png"]
    assert data.labels.tolist() == [0, 1, 1, 1, 1, 1, 2] and has_labels(data)
    skips = _skips(data, corpus)
    assert skips.pop("README.txt") == "not inside a class folder"
    assert skips.pop("cat/notes.txt") == "no image extension"
    missing = corpus.parent / "missing.png"
    assert skips.pop("cat/dangling.png") == f"dangling symlink (its target {missing} does not exist)"
    assert skips.pop("cat/here") == f"symlink loop (leads back to {corpus / 'cat'})"
    assert skips.pop("cat/up") == f"symlink loop (leads back to {corpus})"
    assert skips.pop("cat/self").startswith("symlink loop")
    assert skips.pop("cat/twice") == f"same folder as {corpus / 'cat' / 'sub'}, already scanned"
    assert skips.pop("locked") == "unreadable folder (Permission denied)"
    assert skips.pop("cat/pipe.png") == "not a regular file or folder (a device, pipe or socket)"
    assert skips == {}
    assert [p.name for p in data.ignored] == ["notes.txt"]  # the old view: files without an image extension
    ids = data.item_ids()  # empty and oversized images are items, which fail to decode with their reasons
    with pytest.raises(ImageDecodeError, match="empty file"):
        data.load_image(ids.index("cat/empty.png"))
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        data.load_image(ids.index("cat/bomb.png"))
    assert data.load_image(ids.index("cat/linked.png")).size == data.load_image(ids.index("cat/sub/e.png")).size


@pytest.mark.timeout(60)
def test_image_files_scans_the_same_corpus_unlabelled(corpus):
    data = image_files([corpus])
    assert data.item_ids() == ["caf\\xe9/d.png", "cat/a.png", "cat/bomb.png", "cat/empty.png", "cat/linked.png",
                               "cat/sub/e.png", "dog/b.png"]
    assert data.class_names == [] and set(data.labels.tolist()) == {-1} and not has_labels(data)
    skips = _skips(data, corpus)
    assert skips["README.txt"] == "no image extension" and skips["locked"] == "unreadable folder (Permission denied)"
    assert skips["cat/up"] == f"symlink loop (leads back to {corpus})"
    assert {"cat/dangling.png", "cat/here", "cat/self", "cat/twice", "cat/notes.txt", "cat/pipe.png"} <= set(skips)


def test_links_given_directly_to_image_files(tmp_path):
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(DatasetError, match="gone.png: dangling symlink"):
        image_files([tmp_path / "gone.png"])
    with pytest.raises(DatasetError, match="loop: symlink loop"):
        image_files([tmp_path / "loop"])
    with pytest.raises(DatasetError, match="a symlink that leads nowhere"):
        load_dataset(tmp_path / "loop")


def test_unreadable_dataset_folder_is_a_dataset_error(tmp_path, monkeypatch):
    _img(tmp_path / "data" / "cat" / "a.png")
    _unreadable(monkeypatch, tmp_path / "data")
    with pytest.raises(DatasetError, match=r"data: cannot list the folder: unreadable folder \(Permission denied\)"):
        load_dataset(tmp_path / "data")
    with pytest.raises(DatasetError, match=r"no image files in .*data; left out: data \(unreadable folder"):
        image_files([tmp_path / "data"])


def test_flat_folder_loads_unlabelled(tmp_path):
    flat = tmp_path / "holiday"
    _img(flat / "x.png")
    _img(flat / "y.jpg")
    (flat / "notes.md").write_text("x")
    (flat / "gone.png").symlink_to(tmp_path / "nowhere.png")
    data = load_dataset(flat)
    assert data.item_ids() == ["x.png", "y.jpg"] and data.labels.tolist() == [-1, -1]
    assert data.class_names == [] and not has_labels(data) and data.name == "holiday" and data.split == "all"
    assert _skips(data, flat) == {"gone.png": f"dangling symlink (its target {tmp_path / 'nowhere.png'} does not "
                                              "exist)", "notes.md": "no image extension"}
    with pytest.raises(DatasetError, match="no class sub-folders"):
        image_folder(flat)  # the class-folder reader itself still insists on classes


def test_images_beside_class_folders_are_an_error_naming_one(tmp_path):
    _img(tmp_path / "mixed" / "cat" / "a.png")
    _img(tmp_path / "mixed" / "stray.png")
    _img(tmp_path / "mixed" / "stray2.png")
    with pytest.raises(DatasetError, match=r"mixed: image 'stray.png' \(and 1 more\) lies at the top level beside "
                                           r"the class folders cat/"):
        load_dataset(tmp_path / "mixed")


def test_empty_folder_and_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: empty folder"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    (tmp_path / "docs" / "b.csv").write_text("x")
    with pytest.raises(DatasetError, match=r"docs: no image files; left out: a.txt \(no image extension\), "
                                           r"b.csv \(no image extension\)"):
        load_dataset(tmp_path / "docs")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "cat" / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no images in its 1 class folder\(s\); left out: a.txt"):
        load_dataset(tmp_path / "classes")


def test_non_utf8_class_in_split_folders_and_a_note_beside_them(tmp_path):
    for split in ("train", "test"):
        _img(_bytes_dir(_img(tmp_path / "d" / split / "dog" / "0.png").parents[1], b"caf\xe9") / "0.png")
    (tmp_path / "d" / "LICENSE").write_text("x")
    test = load_dataset(tmp_path / "d")
    assert test.class_names == ["caf\\xe9", "dog"] and test.item_ids() == ["test/caf\\xe9/0.png", "test/dog/0.png"]
    assert _skips(test, tmp_path / "d") == {"LICENSE": "not inside a split folder"}
    val = load_dataset(tmp_path / "d", split="val")  # a hold-out Subset keeps the scan's skips
    assert _skips(val, tmp_path / "d") == {"LICENSE": "not inside a split folder"}
    _img(tmp_path / "d" / "stray.png")
    with pytest.raises(DatasetError, match="'stray.png' lies at the top level beside the split folders test/, train/"):
        load_dataset(tmp_path / "d")


def test_non_utf8_labels_become_valid_text():
    assert parse_labels(f"{CAFE}, dog") == ["caf\\xe9", "dog"]
    assert check_class_names([CAFE, "caf\ud800"], "x") == ["caf\\xe9", "caf\\ud800"]
    with pytest.raises(LabelError, match="duplicate"):
        parse_labels(f"{CAFE},caf\\xe9")  # the same once made valid text


def test_has_labels():
    class Fake:
        class_names = ["a"]
        labels = [-1, 0]

    assert has_labels(Fake())
    Fake.labels = [-1, -1]
    assert not has_labels(Fake())
