"""File-based datasets: ImageFolder, loose image files, CSV/JSONL/JSON manifests, COCO captions."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import DatasetError
from .base import NO_LABEL, FileImageDataset
from .images import is_image_path


def _scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``folder`` (recursively) and the other non-hidden files that were left out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [p for p in files if is_image_path(p)], [p for p in files if not is_image_path(p)]


SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folders(root: Path) -> dict[str, Path]:
    """``{split: folder}`` when every top-level folder of ``root`` is a split (train/, val/, test/), else {}."""
    names = _subfolders(root) if root.is_dir() else []
    if not names or not all(name.lower() in SPLIT_FOLDERS for name in names):
        return {}
    return {SPLIT_FOLDERS[name.lower()]: root / name for name in names}


def image_folder(root: str | Path, hash_content: bool = False, class_names: Sequence[str] | None = None,
                 name: str | None = None) -> FileImageDataset:
    """Class = sub-folder name (sorted, as torchvision's ImageFolder); images found recursively.

    ``class_names`` fixes the class order (and so the label of each folder), as splits of one dataset
    must share it; a folder not in it is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    found_classes = _subfolders(root)
    if not found_classes:
        raise DatasetError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
    classes = list(class_names) if class_names is not None else found_classes
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in found_classes if c not in index]
    if unknown:
        raise DatasetError(f"{root}: class folder {unknown[0]!r} is not among the dataset's classes")
    paths, labels, ignored = [], [], []
    for folder in found_classes:
        found, others = _scan(root / folder)
        paths += found
        labels += [index[folder]] * len(found)
        ignored += others
    dataset = FileImageDataset(paths, labels, classes, root, name or root.name, hash_content)
    dataset.ignored = ignored
    return dataset


def image_files(inputs: Iterable[str | Path], hash_content: bool = False) -> FileImageDataset:
    """Unlabelled images: files given directly (any extension) and image files under given folders."""
    paths: list[Path] = []
    ignored: list[Path] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found, others = _scan(entry)
            paths += found
            ignored += others
        elif entry.exists():
            paths.append(entry)
        else:
            raise DatasetError(f"{entry}: no such file or folder")
    if not paths:
        raise DatasetError(f"no image files in {', '.join(map(str, inputs))}")
    paths = [Path(os.path.abspath(p)) for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    dataset = FileImageDataset(paths, [NO_LABEL] * len(paths), [], root, "images", hash_content)
    dataset.ignored = ignored
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
    names = list(class_names or declared or sorted({str(r["label"]) for r in rows if r.get("label") not in (None, "")}))
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
    if str(label) not in index:
        raise DatasetError(f"{path}: row {line}: label {label!r} is not one of the class names")
    return index[str(label)]


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
