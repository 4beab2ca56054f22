"""Issue 21 item 2: /images/{id} serves only regular image files still inside the indexed folder, checked at
request time (a symlink swapped in after indexing, manifest rows with ../ paths, non-images, FIFOs)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

LOCAL = "http://localhost"
SECRET = b"root:$6$secret-hash:19000:0:99999:7:::\n"


def _png(seed: int, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buffer, format="PNG")
    return buffer.getvalue()


def _ids(client) -> dict[str, int]:
    """Indexed name -> id, from a search for everything."""
    hits = client.get("/search", params={"q": "x", "k": 100}).json()["hits"]
    return {h["name"]: h["id"] for h in hits}


@pytest.fixture
def folder_index(tiny, tmp_path):
    """(client, images folder, outside folder) of an index over images/img{0,1,2}.png."""
    from cliplab.search import build_index
    from cliplab.service import create_app

    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    for i in range(3):
        (images / f"img{i}.png").write_bytes(_png(i))
    (outside / "shadow").write_bytes(SECRET)
    (outside / "private.png").write_bytes(_png(99))
    build_index(tiny, images, tmp_path / "index", cache_dir=tmp_path / "cache", progress=False, workers=0)
    return TestClient(create_app(tmp_path / "index", tiny), base_url=LOCAL), images, outside


def _swap_for_link(path, target) -> None:
    path.unlink()
    os.symlink(target, path)


def test_a_symlink_swapped_in_after_indexing_is_refused(folder_index):
    client, images, outside = folder_index
    ids = _ids(client)
    assert client.get(f"/images/{ids['img1.png']}").content == (images / "img1.png").read_bytes()
    for target in (outside / "shadow", outside / "private.png"):  # a secret, and an image, outside the folder
        _swap_for_link(images / "img1.png", target)
        response = client.get(f"/images/{ids['img1.png']}")
        assert response.status_code == 403, response.text
        assert "outside the indexed folder" in response.json()["detail"]
        assert SECRET not in response.content and _png(99) not in response.content
        assert str(outside) not in response.text
    # a link to a parent folder's file by a relative path: also outside
    _swap_for_link(images / "img1.png", "../outside/private.png")
    assert client.get(f"/images/{ids['img1.png']}").status_code == 403
    # a link that stays inside the folder is served
    _swap_for_link(images / "img1.png", images / "img2.png")
    inside = client.get(f"/images/{ids['img1.png']}")
    assert inside.status_code == 200 and inside.content == (images / "img2.png").read_bytes()
    assert client.get(f"/images/{ids['img0.png']}").status_code == 200


def test_a_linked_parent_folder_is_refused(tiny, tmp_path):
    """The file's own name is not a link, a folder above it is (swapped in after indexing)."""
    from cliplab.search import build_index
    from cliplab.service import create_app

    images, outside = tmp_path / "images", tmp_path / "outside"
    (images / "album").mkdir(parents=True)
    outside.mkdir()
    (images / "album" / "a.png").write_bytes(_png(1))
    (images / "b.png").write_bytes(_png(2))
    (outside / "a.png").write_bytes(SECRET)
    build_index(tiny, images, tmp_path / "index", cache_dir=tmp_path / "cache", progress=False, workers=0)
    client = TestClient(create_app(tmp_path / "index", tiny), base_url=LOCAL)
    ids = _ids(client)
    (images / "album" / "a.png").unlink()
    (images / "album").rmdir()
    os.symlink(outside, images / "album")
    response = client.get(f"/images/{ids['a.png']}")
    assert response.status_code == 403 and SECRET not in response.content
    assert client.get(f"/images/{ids['b.png']}").status_code == 200


def test_a_race_past_the_path_check_is_caught_when_opening(folder_index, monkeypatch):
    """Even when resolution is fooled (a link swapped in after the path was resolved), the open refuses a final
    symlink (O_NOFOLLOW) and the opened file's own path is checked again (Linux)."""
    from cliplab.service import files

    client, images, outside = folder_index
    ids = _ids(client)
    monkeypatch.setattr(files, "_resolved", os.path.abspath)  # resolution sees no link
    _swap_for_link(images / "img1.png", outside / "private.png")
    assert client.get(f"/images/{ids['img1.png']}").status_code == 403
    if not os.path.isdir("/proc/self/fd"):
        return
    (images / "img2.png").unlink()
    os.symlink(outside, images / "linked")
    server = files.ImageFiles(images)
    with pytest.raises(files.NotServed) as refused:
        server.open(str(images / "linked" / "private.png"))
    assert refused.value.status == 403


def test_only_regular_files_that_are_images_are_served(folder_index):
    client, images, _ = folder_index
    ids = _ids(client)
    (images / "img0.png").write_bytes(b"not an image, whatever the name says\n")
    response = client.get(f"/images/{ids['img0.png']}")
    assert response.status_code == 404 and "readable image" in response.json()["detail"]
    assert b"whatever" not in response.content
    (images / "img1.png").unlink()
    os.mkfifo(images / "img1.png")  # opening it must not block, and it is not served
    response = client.get(f"/images/{ids['img1.png']}")
    assert response.status_code == 403 and "regular file" in response.json()["detail"]
    (images / "img1.png").unlink()
    (images / "img1.png").mkdir()
    assert client.get(f"/images/{ids['img1.png']}").status_code in (403, 404)
    # the media type comes from the bytes, not the name: a JPEG under a .png name is image/jpeg
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, format="JPEG")
    (images / "img2.png").write_bytes(buffer.getvalue())
    response = client.get(f"/images/{ids['img2.png']}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == buffer.getvalue()


def _manifest_index(tiny, tmp_path, **build):
    from cliplab.search import build_index
    from cliplab.service import create_app

    data = tmp_path / "data"
    listing = data / "lists"
    listing.mkdir(parents=True)
    (listing / "in.png").write_bytes(_png(5))
    (data / "up.png").write_bytes(_png(6))
    (listing / "manifest.csv").write_text("path,label\nin.png,a\n../up.png,b\n")
    build_index(tiny, listing / "manifest.csv", tmp_path / "index", cache_dir=tmp_path / "cache", progress=False,
                workers=0, **build)
    return TestClient(create_app(tmp_path / "index", tiny), base_url=LOCAL), data


def test_manifest_rows_with_dotdot_paths_are_refused(tiny, tmp_path):
    client, data = _manifest_index(tiny, tmp_path)
    ids = _ids(client)
    assert set(ids) == {"in.png", "up.png"}
    assert client.get(f"/images/{ids['in.png']}").content == (data / "lists" / "in.png").read_bytes()
    response = client.get(f"/images/{ids['up.png']}")
    assert response.status_code == 403 and "outside the indexed folder" in response.json()["detail"]
    assert response.content != (data / "up.png").read_bytes()


def test_serve_outside_is_asked_for_at_build_and_still_refuses_a_swapped_file(tiny, tmp_path):
    """--serve-outside (recorded in the manifest): ../ rows and links leading out are served, as long as the
    file is still a regular image of the size and time it was indexed with."""
    from typer.testing import CliRunner

    from cliplab.cli.app import app
    from cliplab.search import SearchIndex

    client, data = _manifest_index(tiny, tmp_path, serve_outside=True)
    assert SearchIndex.open(tmp_path / "index").manifest["serve_outside"] is True
    ids = _ids(client)
    assert client.get(f"/images/{ids['up.png']}").content == (data / "up.png").read_bytes()
    (data / "other.png").write_bytes(_png(7, size=30))
    _swap_for_link(data / "up.png", data / "other.png")
    response = client.get(f"/images/{ids['up.png']}")
    assert response.status_code == 404 and "changed since it was indexed" in response.json()["detail"]
    assert "--serve-outside" in CliRunner().invoke(app, ["index", "build", "--help"], terminal_width=200).output
