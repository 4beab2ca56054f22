"""File-based datasets: ImageFolder, loose image files, CSV/JSONL/JSON manifests, COCO captions."""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from .base import NO_IMAGE_EXTENSION, NO_LABEL, FileImageDataset, printable
from .images import is_image_path

Skip = tuple[Path, str]  # a path a folder scan left out, and why
OUTSIDE_CLASS_FOLDERS = "not inside a class folder"
_DirKey = tuple[int, int]


def _show(path: str | Path) -> str:
    """A path for messages: valid text even where the name is not UTF-8."""
    return printable(str(path))


def _name(folder: Path) -> str:
    """A folder's own name as valid text, also for ``.`` and other relative paths."""
    return printable(Path(os.path.abspath(folder)).name)


def _listing(folder: Path, skipped: list[Skip]) -> list[str] | None:
    """Sorted entry names of ``folder``, or None (and a skip naming the reason) where it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entry.name for entry in entries)
    except OSError as exc:
        skipped.append((folder, f"unreadable folder ({exc.strerror or exc})"))
        return None


def _probe(path: Path) -> tuple[str, Any]:
    """``("dir", key)``, ``("file", None)`` or ``("skip", reason)``; symlinks are followed."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "skip", "symlink loop (too many levels of symbolic links)"
        if os.path.islink(path) and exc.errno in (errno.ENOENT, errno.ENOTDIR):
            try:
                target = f"its target {_show(os.readlink(path))} does not exist"
            except OSError:
                target = "its target does not exist"
            return "skip", f"dangling symlink ({target})"
        return "skip", f"unreadable ({exc.strerror or exc})"
    if stat.S_ISDIR(info.st_mode):
        return "dir", (info.st_dev, info.st_ino)
    if stat.S_ISREG(info.st_mode):
        return "file", None
    return "skip", "not a regular file or folder (a device, pipe or socket)"


def _ancestors(folder: Path) -> dict[_DirKey, Path]:
    """``folder`` and every folder above its real path, by (device, inode): a link back to one is a loop."""
    real = Path(os.path.realpath(folder))
    out: dict[_DirKey, Path] = {}
    for index, path in enumerate((real, *real.parents)):
        try:
            info = os.stat(path)
        except OSError:
            continue
        out.setdefault((info.st_dev, info.st_ino), folder if index == 0 else path)
    return out


def _scan(folder: Path, above: dict[_DirKey, Path] | None = None) -> tuple[list[Path], list[Skip]]:
    """Image files under ``folder`` (recursively) and what was left out, as (path, reason).

    Symlinks to files and folders are followed; a link back to a folder on the current path (or above
    ``folder``) is a ``symlink loop`` and a second way into an already scanned folder is skipped, so a
    scan always ends. Also left out, with their reasons: files without an image extension, dangling
    symlinks, unreadable folders, devices and pipes. Hidden names (starting with ``.``) are not inputs.
    """
    images: list[Path] = []
    skipped: list[Skip] = []
    chain = dict(above if above is not None else _ancestors(folder))
    kind, key = _probe(folder)
    if kind != "dir":
        return [], [(folder, key if kind == "skip" else "not a folder")]
    chain.setdefault(key, folder)
    seen: dict[_DirKey, Path] = {key: folder}
    stack = [(folder, chain)]
    while stack:
        current, chain = stack.pop()
        for name in _listing(current, skipped) or []:
            if name.startswith("."):
                continue
            path = current / name
            kind, info = _probe(path)
            if kind == "skip":
                skipped.append((path, info))
            elif kind == "file":
                if is_image_path(path):
                    images.append(path)
                else:
                    skipped.append((path, NO_IMAGE_EXTENSION))
            elif info in chain:
                skipped.append((path, f"symlink loop (leads back to {_show(chain[info])})"))
            elif info in seen:
                skipped.append((path, f"same folder as {_show(seen[info])}, already scanned"))
            else:
                seen[info] = path
                stack.append((path, {**chain, info: path}))
    return sorted(images), sorted(skipped)


@dataclass
class FolderLayout:
    """The top level of a folder: sub-folders (by raw name), image files, other files, and what was skipped."""

    root: Path
    folders: list[tuple[str, Path]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    above: dict[_DirKey, Path] = field(default_factory=dict)


def folder_layout(root: Path) -> FolderLayout:
    """What the top level of ``root`` holds; a DatasetError if it cannot be listed."""
    layout = FolderLayout(root, above=_ancestors(root))
    names = _listing(root, layout.skipped)
    if names is None:
        raise DatasetError(f"{_show(root)}: cannot list the folder: {layout.skipped[0][1]}")
    for name in names:
        if name.startswith("."):
            continue
        path = root / name
        kind, info = _probe(path)
        if kind == "skip":
            layout.skipped.append((path, info))
        elif kind == "file":
            (layout.images if is_image_path(path) else layout.others).append(path)
        elif info in layout.above:
            layout.skipped.append((path, f"symlink loop (leads back to {_show(layout.above[info])})"))
        else:
            layout.folders.append((name, path))
    return layout


def left_out(skipped: Sequence[Skip], limit: int = 5) -> str:
    """``"; left out: a.txt (no image extension), ..."`` for an error message, or "" when nothing was."""
    if not skipped:
        return ""
    shown = ", ".join(f"{_show(path.name)} ({reason})" for path, reason in skipped[:limit])
    return f"; left out: {shown}" + (f" and {len(skipped) - limit} more" if len(skipped) > limit else "")


def stray_images_error(layout: FolderLayout, inside: str) -> DatasetError:
    """Images beside class (or split) folders: ambiguous, so an error naming the first one."""
    first, count = layout.images[0], len(layout.images)
    folders = ", ".join(f"{_show(name)}/" for name, _ in layout.folders[:3])
    folders += " ..." if len(layout.folders) > 3 else ""
    return DatasetError(f"{_show(layout.root)}: image {_show(first.name)!r}"
                        + (f" (and {count - 1} more)" if count > 1 else "")
                        + f" lies at the top level beside the {inside} folders {folders}; move the images into "
                        f"a {inside} folder, or the folders out, to read it as one unlabelled folder")


SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def split_folders(root: Path) -> dict[str, Path]:
    """``{split: folder}`` when every top-level folder of ``root`` is a split (train/, val/, test/), else {}.

    Two folders naming one split (``val/`` and ``valid/``) are a DatasetError.
    """
    folders = folder_layout(root).folders if root.is_dir() else []
    if not folders or not all(name.lower() in SPLIT_FOLDERS for name, _ in folders):
        return {}
    out: dict[str, Path] = {}
    for name, path in folders:
        split = SPLIT_FOLDERS[name.lower()]
        if split in out:
            raise DatasetError(f"{_show(root)}: folders {out[split].name!r} and {name!r} are both the {split} split")
        out[split] = path
    return out


def image_folder(root: str | Path, hash_content: bool = False, class_names: Sequence[str] | None = None,
                 name: str | None = None) -> FileImageDataset:
    """Class = sub-folder name (sorted, as torchvision's ImageFolder); images found recursively.

    ``class_names`` fixes the class order (and so the label of each folder), as splits of one dataset
    must share it; a folder not in it is an error. A folder name that is not valid UTF-8 gives the
    class name with ``\\xNN`` for each such byte (``caf\\xe9``). Images at the top level, beside
    the class folders, are an error (the layout is ambiguous); other top-level files, and everything a
    scan leaves out (see :func:`_scan`), are listed in ``dataset.skipped`` with their reasons.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{_show(root)}: not a folder")
    layout = folder_layout(root)
    if not layout.folders:
        raise DatasetError(f"{_show(root)}: no class sub-folders (expected ROOT/<class>/<image>)"
                           + left_out(layout.skipped + [(p, OUTSIDE_CLASS_FOLDERS) for p in layout.others]))
    if layout.images:
        raise stray_images_error(layout, "class")
    found = [printable(folder) for folder, _ in layout.folders]
    if len(set(found)) < len(found):
        twice = next(c for c in found if found.count(c) > 1)
        raise DatasetError(f"{_show(root)}: two class folders are both named {twice!r} once made valid text")
    classes = list(class_names) if class_names is not None else found
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DatasetError(f"{_show(root)}: class folder {unknown[0]!r} is not among the dataset's classes")
    paths: list[Path] = []
    labels: list[int] = []
    skipped = layout.skipped + [(p, OUTSIDE_CLASS_FOLDERS) for p in layout.others]
    for (_, folder), cls in zip(layout.folders, found):
        images, left = _scan(folder, layout.above)
        paths += images
        labels += [index[cls]] * len(images)
        skipped += left
    if not paths:
        raise DatasetError(f"{_show(root)}: no images in its {len(found)} class folder(s)" + left_out(sorted(skipped)))
    dataset = FileImageDataset(paths, labels, classes, root, name or _name(root), hash_content)
    dataset.skipped = sorted(skipped)
    return dataset


def image_files(inputs: Iterable[str | Path], hash_content: bool = False) -> FileImageDataset:
    """Unlabelled images: files given directly (any extension) and image files under given folders.

    What the folder scans leave out is listed in ``dataset.skipped`` with reasons (see :func:`_scan`);
    an input that does not exist, or a dangling or looping link given directly, is a DatasetError.
    """
    inputs = [Path(entry) for entry in inputs]
    paths: list[Path] = []
    skipped: list[Skip] = []
    for entry in inputs:
        kind, info = _probe(entry)
        if kind == "dir":
            found, left = _scan(entry)
            paths += found
            skipped += left
        elif kind == "file":
            paths.append(entry)
        elif not os.path.lexists(entry):
            raise DatasetError(f"{_show(entry)}: no such file or folder")
        else:
            raise DatasetError(f"{_show(entry)}: {info}")
    if not paths:
        raise DatasetError(f"no image files in {', '.join(map(_show, inputs))}" + left_out(skipped))
    paths = [Path(os.path.abspath(p)) for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    dataset = FileImageDataset(paths, [NO_LABEL] * len(paths), [], root, "images", hash_content)
    dataset.skipped = skipped
    return dataset


def manifest(path: str | Path, class_names: Sequence[str] | None = None, hash_content: bool = False):
    """A CSV (``path,label[,caption]`` header), JSONL (one object a line) or JSON manifest.

    JSON manifests are ``{"classes": [...], "images": [{"image": ..., "label": ...}]}`` (the layout
    of ``labels.json`` in ../shared/datasets). Paths are relative to the manifest's folder. Labels
    may be class names or integer indices; class names come from ``class_names``, the JSON
    ``classes`` list, or the sorted distinct label strings.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found")
    rows, declared = _read_manifest_rows(path)
    if not rows:
        raise DatasetError(f"{path}: manifest has no rows")
    labelled = {printable(str(r["label"])) for r in rows if r.get("label") not in (None, "")}
    names = [printable(str(n)) for n in class_names or declared or sorted(labelled)]
    index = {name: i for i, name in enumerate(names)}
    paths, labels, captions, splits = [], [], [], []
    for line, row in enumerate(rows, start=2 if path.suffix == ".csv" else 1):
        file = row.get("path") or row.get("image")
        if not file:
            raise DatasetError(f"{path}: row {line} has no 'path' field")
        paths.append(path.parent / file)
        labels.append(_label_index(row.get("label"), index, names, path, line))
        caption = row.get("caption") or row.get("captions")
        captions.append([caption] if isinstance(caption, str) else list(caption or []))
        splits.append(str(row["split"]) if row.get("split") not in (None, "") else None)
    has_captions = any(captions)
    dataset = FileImageDataset(paths, labels, names, path.parent, path.stem, hash_content,
                               captions if has_captions else None)
    if any(s is not None for s in splits):
        dataset.row_splits = splits
    return dataset


def _read_manifest_rows(path: Path) -> tuple[list[dict], list[str] | None]:
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or "path" not in reader.fieldnames:
                    raise DatasetError(f"{path}: CSV manifest needs a header with a 'path' column")
                return list(reader), None
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            rows, classes = [json.loads(line) for line in lines if line.strip()], None
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, list):
                rows, classes = data, None
            elif isinstance(data, dict) and isinstance(data.get("images"), list):
                rows, classes = data["images"], data.get("classes") or data.get("class_names")
            else:
                raise DatasetError(f"{path}: JSON manifest must be a list of rows or have an 'images' list")
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise DatasetError(f"{path}: unreadable or malformed manifest ({exc})") from exc
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DatasetError(f"{path}: row {number} is not an object with 'path' and 'label'")
    return rows, classes


def _label_index(label, index: dict[str, int], names: list[str], path: Path, line: int) -> int:
    if label is None or label == "":
        return NO_LABEL
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit() and label not in index):
        value = int(label)
        if not 0 <= value < len(names):
            raise DatasetError(f"{path}: row {line}: label {value} outside 0..{len(names) - 1}")
        return value
    if printable(str(label)) not in index:
        raise DatasetError(f"{_show(path)}: row {line}: label {printable(str(label))!r} is not one of the class names")
    return index[printable(str(label))]


def coco_captions(root: str | Path, annotation: str = "captions.json", split: str | None = None):
    """COCO images with their captions (``captions.json`` as in ../shared/datasets/coco_mini).

    Also reads the official ``captions_*.json`` layout (``images`` + ``annotations``).
    """
    root = Path(root)
    file = root / annotation if (root / annotation).is_file() else root
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{file}: cannot read COCO captions ({exc})") from exc
    entries = data.get("images", [])
    if "annotations" in data:
        by_id: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            by_id.setdefault(ann["image_id"], []).append(ann["caption"])
        entries = [{"image": e["file_name"], "captions": by_id.get(e["id"], [])} for e in entries]
    if split:
        entries = [e for e in entries if e.get("split") == split]
    base = Path(file).parent
    missing = next((n for n, e in enumerate(entries, 1) if not isinstance(e, dict) or "image" not in e), None)
    if missing is not None:
        raise DatasetError(f"{file}: image entry {missing} has no 'image' field")
    paths = [base / e["image"] for e in entries]
    captions = [list(e.get("captions", [])) for e in entries]
    return FileImageDataset(paths, [NO_LABEL] * len(paths), [], base, "coco", captions=captions)
