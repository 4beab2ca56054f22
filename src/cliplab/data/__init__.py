"""Datasets, safe image decoding, class names and prompt templates."""

from .archives import cifar, mnist, read_idx, safe_unpickle
from .base import NO_LABEL, ArrayImageDataset, FileImageDataset, ImageDataset, Subset, has_labels, printable
from .folders import coco_captions, image_files, image_folder, manifest
from .images import load_image, to_rgb
from .prompts import (
    builtin_class_names,
    check_class_names,
    class_prompts,
    distinct_class_names,
    fill_template,
    load_templates,
    parse_labels,
    read_class_names,
    template_sets,
)
from .registry import dataset_names, dataset_splits, default_data_root, imagenet_wnids, load_dataset
from .splits import HOLDOUT_FRACTION, HOLDOUT_SEED, stratified_holdout

__all__ = [
    "NO_LABEL", "ArrayImageDataset", "FileImageDataset", "ImageDataset", "Subset",
    "HOLDOUT_FRACTION", "HOLDOUT_SEED", "builtin_class_names", "check_class_names", "class_prompts",
    "dataset_splits", "distinct_class_names", "imagenet_wnids", "stratified_holdout", "cifar", "coco_captions",
    "dataset_names", "default_data_root", "has_labels", "printable",
    "fill_template", "image_files", "image_folder", "load_dataset", "load_image", "load_templates", "manifest",
    "mnist", "parse_labels", "read_class_names", "read_idx", "safe_unpickle", "template_sets", "to_rgb",
]
