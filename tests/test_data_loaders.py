"""Data loaders: image folders and webdataset shards built with PIL in tmp_path, bad samples, dispatch."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stepdistill.data import load_dataset, load_emoji32, load_imagefolder, load_webdataset
from stepdistill.errors import ConfigError, DataError

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (128, 64, 32)]
CAPTIONS = ["red square", "green square", "blue square", "yellow square", "cyan square", "brown square"]


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def solid(colour: tuple[int, ...], size: tuple[int, int] = (40, 40), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def write_folder(root: Path, lines: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    """Six solid-colour PNGs (two in a subfolder) with a 'text' and an 'alt' caption each."""
    lines = []
    for i, (colour, caption) in enumerate(zip(COLOURS, CAPTIONS)):
        name = f"img{i}.png" if i < 4 else f"sub/img{i}.png"
        (tmp_path / "ds" / name).parent.mkdir(parents=True, exist_ok=True)
        solid(colour).save(tmp_path / "ds" / name)
        lines.append(json.dumps({"file_name": name, "text": caption, "alt": f"alt {i}"}))
    return write_folder(tmp_path / "ds", lines)


def write_shard(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path) -> Path:
    """Two shards of three samples: PNG with .txt captions, then JPEG with .json "caption"/"text" captions."""
    first = {}
    for i in range(3):
        first[f"s{i:03d}.png"] = png_bytes(solid(COLOURS[i]))
        first[f"s{i:03d}.txt"] = CAPTIONS[i].encode()
    second = {}
    for i in range(3, 6):
        key = f"part/s{i:03d}"
        second[f"{key}.jpg"] = png_bytes(solid(COLOURS[i]), "JPEG")
        field = "caption" if i % 2 else "text"
        second[f"{key}.json"] = json.dumps({field: CAPTIONS[i], "width": 40}).encode()
    write_shard(tmp_path / "shard-000.tar", first)
    write_shard(tmp_path / "shard-001.tar", second)
    return tmp_path


def expected_pixels(n: int = 6, resolution: int = 32) -> np.ndarray:
    return np.stack([np.full((resolution, resolution, 3), c, dtype=np.uint8) for c in COLOURS[:n]])


# imagefolder


def test_imagefolder_round_trip(folder):
    data = load_imagefolder(folder, resolution=16)
    assert data.images.shape == (6, 16, 16, 3) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images, expected_pixels(resolution=16))
    assert data.captions == CAPTIONS


def test_imagefolder_caption_column(folder):
    assert load_imagefolder(folder, caption_column="alt").captions == [f"alt {i}" for i in range(6)]


def test_imagefolder_wrong_caption_column_names_reason(folder):
    with pytest.raises(DataError, match=r"no readable images \(skipped 6 samples \(6 missing caption\)\)"):
        load_imagefolder(folder, caption_column="prompt")


def test_rgba_composited_on_white_and_center_cropped(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent black must become white, not black
    rgba.paste((0, 0, 255, 255), (16, 0, 32, 32))
    rgba.save(tmp_path / "rgba.png")
    wide = Image.new("RGB", (48, 32), (255, 0, 0))  # red side strips that the centre crop removes
    wide.paste((0, 255, 0), (8, 0, 40, 32))
    wide.save(tmp_path / "wide.png")
    folder = write_folder(tmp_path, [json.dumps({"file_name": "rgba.png", "text": "half"}),
                                     json.dumps({"file_name": "wide.png", "text": "wide"})])
    data = load_imagefolder(folder, resolution=32)
    assert data.images[0, 5, 0].tolist() == [255, 255, 255] and data.images[0, 5, 31].tolist() == [0, 0, 255]
    np.testing.assert_array_equal(data.images[1], np.full((32, 32, 3), (0, 255, 0), dtype=np.uint8))


def test_bad_samples_skipped_with_counts(folder):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    full = png_bytes(noise)
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "text.png").write_text("not an image")
    extra = [json.dumps({"file_name": "truncated.png", "text": "cut"}),
             json.dumps({"file_name": "text.png", "text": "text"}),
             json.dumps({"file_name": "gone.png", "text": "gone"}),
             json.dumps({"file_name": "img0.png", "text": "  "}),
             json.dumps({"file_name": "img1.png"}),
             '{"file_name": "img2.png", "text": broken',
             json.dumps(["not", "an", "object"])]
    with open(folder / "metadata.jsonl", "a", encoding="utf-8") as f:
        f.write("\n".join(extra) + "\n")
    with pytest.warns(UserWarning) as record:
        data = load_imagefolder(folder)
    assert data.captions == CAPTIONS  # the six good samples survive, in order
    assert len(record) == 1
    message = str(record[0].message)
    for part in ("skipped 7 samples", "2 unreadable image", "2 invalid metadata line", "1 missing file",
                 "1 empty caption", "1 missing caption", "kept 6", str(folder)):
        assert part in message


def test_no_readable_images(tmp_path):
    (tmp_path / "a.png").write_text("not an image")
    folder = write_folder(tmp_path / "ds", [json.dumps({"file_name": "../a.png", "text": "a"})])
    with pytest.raises(DataError, match=rf"dataset '{folder}' has no readable images.*1 unreadable image"):
        load_imagefolder(folder)


@pytest.mark.parametrize("make", ["empty", "images_only", "missing", "file"])
def test_imagefolder_errors_name_path(tmp_path, make):
    path = tmp_path / "ds"
    if make == "empty":
        path.mkdir()
    elif make == "images_only":
        path.mkdir()
        solid(COLOURS[0]).save(path / "a.png")
    elif make == "file":
        path.write_text("x")
    with pytest.raises(DataError) as err:
        load_imagefolder(path)
    assert f"'{path}'" in str(err.value) and "metadata.jsonl" in str(err.value) and "\n" not in str(err.value)


def test_empty_metadata_raises(tmp_path):
    folder = write_folder(tmp_path, [""])
    with pytest.raises(DataError, match=rf"'{tmp_path}' has no readable images; expected"):
        load_imagefolder(folder)


# webdataset


@pytest.mark.parametrize("spec", ["shard-{000..001}.tar", "shard-*.tar", "shard-00{0,1}.tar", "list"])
def test_webdataset_shards(shards, spec):
    source = [shards / "shard-000.tar", str(shards / "shard-001.tar")] if spec == "list" else str(shards / spec)
    data = load_webdataset(source, resolution=8)
    assert data.captions == CAPTIONS
    assert data.images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(data.images[:3], expected_pixels(3, 8))  # PNG: exact
    assert np.abs(data.images.astype(int) - expected_pixels(6, 8)).max() <= 3  # JPEG: close


def test_brace_range_keeps_zero_padding(shards):
    with pytest.raises(DataError, match=r"shard '.*shard-002\.tar' does not exist"):
        load_webdataset(str(shards / "shard-{000..002}.tar"))


def test_webdataset_bad_samples_skipped(shards):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    write_shard(shards / "shard-002.tar", {
        "a.png": png_bytes(noise)[:300], "a.txt": b"cut",  # truncated image
        "b.png": png_bytes(solid(COLOURS[0])), "b.txt": b"",  # empty caption
        "c.png": png_bytes(solid(COLOURS[0])), "c.json": b'{"width": 3}',  # json without caption
        "d.txt": b"caption without image",
        "e.webp": png_bytes(solid(COLOURS[2]), "WEBP"), "e.txt": b"webp ok",
    })
    (shards / "shard-003.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.warns(UserWarning) as record:
        data = load_webdataset(str(shards / "shard-{000..003}.tar"))
    assert data.captions == CAPTIONS + ["webp ok"]
    message = str(record[0].message)
    for part in ("skipped 5 samples", "1 unreadable image", "1 empty caption", "1 missing caption",
                 "1 sample without image", "1 unreadable shard"):
        assert part in message


def test_webdataset_shards_are_read_one_sample_at_a_time(tmp_path, monkeypatch):
    """Only the files of the sample being built are held (a shard can be a gigabyte); a shard cut in the middle
    keeps the samples before the cut."""
    import tarfile as tarmodule

    from stepdistill.data.loaders import _shard_samples

    files = {}
    for i in range(4):
        files[f"k{i}.png"] = png_bytes(solid(COLOURS[i]))
        files[f"k{i}.txt"] = CAPTIONS[i].encode()
    shard = write_shard(tmp_path / "s.tar", files)
    extracted = []
    extract = tarmodule.TarFile.extractfile
    monkeypatch.setattr(tarmodule.TarFile, "extractfile", lambda self, m: extracted.append(m.name) or extract(self, m))
    first = next(_shard_samples(shard))
    assert first.caption == CAPTIONS[0] and extracted == ["k0.png", "k0.txt"]
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(CAPTIONS[2].encode()) + 2])  # inside the third sample's caption
    with pytest.warns(UserWarning, match="1 unreadable shard"):
        kept = load_webdataset(cut)
    assert kept.captions[:2] == CAPTIONS[:2]


def test_webdataset_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="nothere.tar"):
        load_webdataset(tmp_path / "nothere.tar")
    with pytest.raises(DataError, match=r"shard '.*\*\.tar' matches no files"):
        load_webdataset(str(tmp_path / "*.tar"))
    empty = write_shard(tmp_path / "empty.tar", {"a.txt": b"caption only"})
    with pytest.raises(DataError, match=rf"'{empty}' has no readable images"):
        load_webdataset(empty)


# dispatch


@pytest.fixture
def npz(tmp_path) -> Path:
    path = tmp_path / "small.npz"
    np.savez_compressed(path, images=expected_pixels(6, 16), captions=np.array(CAPTIONS))
    return path


@pytest.mark.parametrize("kind", ["folder", "tar", "brace", "glob", "npz"])
def test_load_dataset_dispatch(folder, shards, npz, kind):
    spec = {"folder": folder, "tar": shards / "shard-000.tar", "brace": str(shards / "shard-{000..001}.tar"),
            "glob": str(shards / "shard-*.tar"), "npz": npz}[kind]
    data = load_dataset(spec, resolution=8)
    n = 3 if kind == "tar" else 6
    assert data.captions == CAPTIONS[:n] and data.images.shape == (n, 8, 8, 3)
    assert np.abs(data.images.astype(int) - expected_pixels(n, 8)).max() <= 3


@pytest.mark.parametrize("spec", ["missing_dir", "notes.csv", "missing.npz"])
def test_load_dataset_rejects(tmp_path, spec):
    path = tmp_path / spec
    if spec == "notes.csv":
        path.write_text("a,b\n")
    with pytest.raises(DataError) as err:
        load_dataset(path)
    message = str(err.value)
    assert f"'{path}'" in message and "emoji32" in message and ".npz" in message and "\n" not in message


def test_load_dataset_bad_npz_and_resolution(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        load_dataset(bad)
    with pytest.raises(ConfigError, match="resolution 0"):
        load_dataset("emoji32", resolution=0)


def test_shipped_emoji32_via_dispatch():
    data = load_dataset("emoji32")
    assert data.images.shape == (1388, 32, 32, 3) and "hamster face" in data.captions
    np.testing.assert_array_equal(data.images, load_emoji32().images)
    assert load_dataset(None).captions == data.captions
    small = load_dataset(None, resolution=16)
    assert small.images.shape == (1388, 16, 16, 3) and small.images.dtype == np.uint8
    assert small.captions == data.captions
    # a downsampled glyph keeps its average colour
    assert np.abs(small.images.mean(axis=(1, 2)) - data.images.mean(axis=(1, 2))).max() < 6
