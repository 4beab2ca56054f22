"""Dataset formats built in temporary folders: manifests, CIFAR pickles, idx files, COCO JSON."""

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from cliplab.data import cifar, coco_captions, image_folder, load_dataset, manifest, mnist, safe_unpickle
from cliplab.errors import DatasetError


def _img(path, color=(1, 2, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def test_image_folder_classes_sorted_and_recursive(tmp_path):
    _img(tmp_path / "dog" / "a.png")
    _img(tmp_path / "cat" / "sub" / "b.JPG")
    (tmp_path / "cat" / "notes.txt").write_text("x")
    data = image_folder(tmp_path)
    assert data.class_names == ["cat", "dog"]
    assert data.item_ids() == ["cat/sub/b.JPG", "dog/a.png"] and data.labels.tolist() == [0, 1]


def test_empty_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="no class sub-folders"):
        image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        image_folder(tmp_path)


def test_csv_manifest_with_names_and_captions(tmp_path):
    _img(tmp_path / "x.png")
    _img(tmp_path / "y.png")
    (tmp_path / "m.csv").write_text("path,label,caption\nx.png,dog,a dog\ny.png,cat,a cat\n")
    data = manifest(tmp_path / "m.csv")
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [1, 0]
    assert data.captions == [["a dog"], ["a cat"]]


def test_jsonl_and_json_manifests(tmp_path):
    _img(tmp_path / "x.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "x.png", "label": 1}) + "\n")
    (tmp_path / "m.json").write_text(json.dumps({"classes": ["a", "b"], "images": [{"image": "x.png", "label": "b"}]}))
    assert manifest(tmp_path / "m.jsonl", class_names=["a", "b"]).labels.tolist() == [1]
    assert manifest(tmp_path / "m.json").labels.tolist() == [1]


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,label\nx.png,a\n", "'path' column"),
        ("path,label\n", "no rows"),
        ("path,label\nx.png,zebra\n", "row 2: label 'zebra'"),
    ],
)
def test_bad_csv_manifests_name_the_problem(tmp_path, content, message):
    (tmp_path / "m.csv").write_text(content)
    names = ["a", "b"] if "zebra" in content else None
    with pytest.raises(DatasetError, match=message):
        manifest(tmp_path / "m.csv", class_names=names)


def _write_cifar(folder, images, labels, names, variant="cifar10"):
    folder.mkdir(parents=True)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    if variant == "cifar10":
        batch = {"batch_label": "testing batch", "labels": labels, "data": data, "filenames": ["f"] * len(labels)}
        meta_name, meta = "batches.meta", {"label_names": names}
        files = {"test_batch": batch}
    else:
        files = {"test": {"fine_labels": labels, "coarse_labels": labels, "data": data}}
        meta_name, meta = "meta", {"fine_label_names": names}
    for name, obj in {**files, meta_name: meta}.items():
        with open(folder / name, "wb") as handle:
            pickle.dump(obj, handle, protocol=2)


def test_cifar_pickles_planar_layout_decoded(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    _write_cifar(tmp_path / "cifar-10-batches-py", images, [2, 0, 1], ["a", "b", "c"])
    data = cifar(tmp_path, "cifar10")
    assert len(data) == 3 and data.labels.tolist() == [2, 0, 1] and data.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(np.asarray(data.load_image(1)), images[1])
    _write_cifar(tmp_path / "c100" / "cifar-100-python", images, [5, 6, 7], [f"n{i}" for i in range(100)], "cifar100")
    data100 = cifar(tmp_path / "c100", "cifar100")
    assert data100.labels.tolist() == [5, 6, 7] and len(data100.class_names) == 100


def test_malicious_pickle_is_refused_without_running(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load global"):
        safe_unpickle(path)
    assert not (tmp_path / "pwned").exists()


def _idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def test_mnist_idx_files(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 3], np.uint8))
    data = mnist(tmp_path)
    assert data.labels.tolist() == [7, 3] and data.class_names[7] == "7"
    assert np.asarray(data.load_image(1))[..., 0].tolist() == images[1].tolist()


def test_truncated_idx_file(tmp_path):
    header = bytes([0, 0, 8, 1]) + struct.pack(">I", 10)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(header + b"\x01\x02")
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10, 2, 2), np.uint8))
    with pytest.raises(DatasetError, match="holds 2 bytes"):
        mnist(tmp_path)


def test_coco_official_layout(tmp_path):
    _img(tmp_path / "a.jpg")
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}],
           "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 1, "caption": "two"}]}
    (tmp_path / "captions_val.json").write_text(json.dumps(ann))
    data = coco_captions(tmp_path / "captions_val.json")
    assert data.captions == [["one", "two"]] and len(data) == 1


def test_unknown_dataset_name():
    with pytest.raises(DatasetError, match="cifar10"):
        load_dataset("no-such-dataset")


def test_jsonl_row_that_is_not_an_object(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"path": "x.png", "label": "a"}\n["y.png", "b"]\n')
    with pytest.raises(DatasetError, match="row 2 is not an object"):
        manifest(tmp_path / "m.jsonl")


def test_curated_names_do_not_replace_numeric_folder_names(tmp_path):
    for i in range(10):
        _img(tmp_path / "cifar10" / "test" / str(i) / "a.png")
    data = load_dataset("cifar10", root=tmp_path)
    assert data.class_names == sorted(str(i) for i in range(10))


def test_manifest_with_only_nonstandard_split_names_asks_for_one(tmp_path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / name)
    rows = [{"image": "a.png", "caption": "x", "split": "val2017"}, {"image": "b.png", "caption": "y", "split": "tr"}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DatasetError, match="splits tr, val2017 .*--split NAME"):
        load_dataset(path)
    chosen = load_dataset(path, split="val2017")
    assert len(chosen) == 1 and chosen.split == "val2017"
