"""Read image-caption data from the sources the diffusers training scripts read.

Sources: the shipped ``emoji32`` set (or another .npz), a Hugging Face ``imagefolder`` (images plus a
``metadata.jsonl``) and webdataset .tar shards (the format of diffusers' LCM distillation examples).
Every image is made RGB on white, centre-cropped to a square and resized with LANCZOS, so all sources
give the same (R, R, 3) uint8 images. Unusable samples are skipped and counted in one warning, because
one bad file in a scraped set should not stop a training run; a source with nothing usable is a DataError.

``open_dataset`` gives a :class:`SampleSource` that decodes one sample at a time (a set too big for memory
is encoded to latents as it is read); ``load_dataset`` collects one into an in-memory ``ImageCaptionSet``.
"""
from __future__ import annotations

import glob
import io
import json
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from stepdistill.data.emoji32 import ImageCaptionSet, emoji32_path, load_emoji32
from stepdistill.errors import ConfigError, DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset keys, in order of preference
METADATA_FILE = "metadata.jsonl"
DATASET_KINDS = ("'emoji32', an image folder with metadata.jsonl, webdataset .tar shards "
                 "(a path, a brace pattern like shard-{000..003}.tar or a glob) or a .npz")
# PIL raises these for truncated, malformed or oversized files depending on the format plugin.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_BRACE = re.compile(r"\{([^{}]*)\}")
_GLOB_CHARS = set("*?[")


@dataclass
class _RawSample:
    """One sample before decoding: an image file or its bytes and a caption, or ``skip`` saying why not."""

    image: Path | bytes | np.ndarray | None = None  # a file, its bytes, or pixels already decoded (.npz sets)
    caption: object = None  # as read (JSON may hold any type); only a non-empty string is usable
    skip: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Images


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white, as the emoji32 glyphs were rendered (not black, PIL's default)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _fit(image: Image.Image, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize with LANCZOS, like the diffusers text-to-image scripts."""
    square = ImageOps.fit(image, (resolution, resolution), method=Image.LANCZOS, centering=(0.5, 0.5))
    return np.asarray(square, dtype=np.uint8)


def _decode(source: Path | bytes | np.ndarray, resolution: int) -> np.ndarray | None:
    """Decoded, fitted pixels, or None when the file is missing, truncated or not an image."""
    if isinstance(source, np.ndarray):
        return source if source.shape[:2] == (resolution, resolution) else _fit(Image.fromarray(source), resolution)
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
            image.load()  # decode now so a truncated file fails here, not later
            return _fit(_to_rgb(ImageOps.exif_transpose(image)), resolution)
    except _DECODE_ERRORS:
        return None


def _check_resolution(resolution: int) -> None:
    """Reject a side length that cannot make an image before reading any data."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"resolution {resolution!r} is not allowed; expected a positive integer")


# ---------------------------------------------------------------------------------------------------------------
# Collecting samples


def _clean_caption(caption: object) -> str | None:
    """The stripped caption if it is a non-empty string, else None."""
    return (caption.strip() or None) if isinstance(caption, str) else None


def _problem(raw: _RawSample) -> str | None:
    """Why a sample cannot be used before decoding it, or None."""
    if raw.skip:
        return raw.skip
    if not isinstance(raw.caption, str):
        return "missing caption"
    if _clean_caption(raw.caption) is None:
        return "empty caption"
    if isinstance(raw.image, Path) and not raw.image.is_file():
        return "missing file"
    return None


def _summary(skipped: Counter[str]) -> str:
    """'5 samples (3 unreadable image, 2 empty caption)', most frequent reason first."""
    reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
    return f"{sum(skipped.values())} samples ({reasons})"


@dataclass
class SampleSource:
    """A dataset read lazily: ``samples()`` decodes one sample at a time, so no more than one image is held.

    ``raws`` makes a fresh iterator of undecoded samples on every call; ``files`` are the files whose sizes and
    times identify the data (for a latent cache). Skips are counted as samples are read; ``finish`` warns once
    with the counts, or raises when nothing was usable.
    """

    name: str
    expected: str
    resolution: int
    raws: Callable[[], Iterable[_RawSample]]
    files: list[Path] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    kept: int = 0

    def samples(self, rank: int = 0, world: int = 1) -> Iterator[tuple[int, np.ndarray, str]]:
        """(position, pixels, caption) of the usable samples whose position in the source is ``rank`` modulo
        ``world``; the others are not decoded (each process of a run reads its own share)."""
        for position, raw in enumerate(self.raws()):
            if position % world != rank:
                continue
            reason = _problem(raw)
            pixels = None if reason else _decode(raw.image, self.resolution)
            if pixels is None:
                self.skipped[reason or "unreadable image"] += 1
                continue
            self.kept += 1
            yield position, pixels, _clean_caption(raw.caption)

    def finish(self, kept: int | None = None, skipped: Counter[str] | None = None) -> None:
        """Warn with the skip counts, or raise if nothing was usable; ``kept``/``skipped`` override the counts
        of this process (the totals over every process's share)."""
        kept = self.kept if kept is None else kept
        skipped = self.skipped if skipped is None else skipped
        if not kept:
            found = f" (skipped {_summary(skipped)})" if skipped else ""
            raise DataError(f"dataset '{self.name}' has no readable images{found}; expected {self.expected}")
        if skipped:
            warnings.warn(f"dataset '{self.name}': skipped {_summary(skipped)}; kept {kept}", stacklevel=3)


def _collect(source: SampleSource) -> ImageCaptionSet:
    """Every usable sample of ``source`` in memory."""
    images, captions = [], []
    for _, pixels, caption in source.samples():
        images.append(pixels)
        captions.append(caption)
    source.finish()
    return ImageCaptionSet(images=np.stack(images), captions=captions)


# ---------------------------------------------------------------------------------------------------------------
# imagefolder


def _metadata_sample(root: Path, line: str, caption_column: str) -> _RawSample:
    """One metadata.jsonl line as a sample; a line that is not a JSON object with a file_name is skipped."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return _RawSample(skip="invalid metadata line")
    if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
        return _RawSample(skip="invalid metadata line")
    return _RawSample(image=root / record["file_name"], caption=record.get(caption_column))


def _metadata_samples(root: Path, caption_column: str) -> Iterator[_RawSample]:
    """Samples in metadata.jsonl order (the Hugging Face imagefolder convention); blank lines are ignored."""
    with open(root / METADATA_FILE, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.strip():
                yield _metadata_sample(root, line, caption_column)


def load_imagefolder(path: str | Path, resolution: int = 32, caption_column: str = "text") -> ImageCaptionSet:
    """Load a Hugging Face ``imagefolder``: image files plus ``metadata.jsonl`` lines with ``file_name``
    (relative to ``path``) and a caption field named ``caption_column``.

    Args:
        path: the folder holding ``metadata.jsonl``.
        resolution: side length of the square output images.
        caption_column: the metadata field holding each caption.
    """
    return _collect(_imagefolder_source(path, resolution, caption_column))


def _imagefolder_source(path: str | Path, resolution: int, caption_column: str) -> SampleSource:
    _check_resolution(resolution)
    root = Path(path)
    expected = (f'a folder of images with {METADATA_FILE} lines like '
                f'{{"file_name": "0001.png", "{caption_column}": "a caption"}}')
    if not root.is_dir():
        raise DataError(f"dataset '{path}' is not a folder; expected {expected}")
    if not (root / METADATA_FILE).is_file():
        raise DataError(f"dataset '{path}' has no {METADATA_FILE}; expected {expected}")
    return SampleSource(str(path), expected, resolution, lambda: _metadata_samples(root, caption_column),
                        files=[root / METADATA_FILE])


# ---------------------------------------------------------------------------------------------------------------
# webdataset


def _expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..003}`` ranges (keeping zero padding) and ``{a,b}`` lists, as webdataset's braceexpand does."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, rests = pattern[: match.start()], _expand_braces(pattern[match.end():])
    return [head + item + rest for item in _brace_items(match.group(1)) for rest in rests]


def _brace_items(body: str) -> list[str]:
    """The alternatives one brace group stands for; a group that is neither a range nor a list stays literal."""
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = max(len(first), len(last)) if first.startswith("0") or last.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        return [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    return body.split(",") if "," in body else ["{" + body + "}"]


def _shard_paths(pattern: str) -> list[Path]:
    """The shard files one path, brace pattern or glob names; a name that matches nothing is a DataError."""
    paths = []
    for name in _expand_braces(pattern):
        is_glob = bool(_GLOB_CHARS & set(name))
        matches = sorted(glob.glob(name)) if is_glob else [name] if Path(name).is_file() else []
        if not matches:
            problem = "matches no files" if is_glob else "does not exist"
            raise DataError(f"webdataset shard '{name}' {problem}; expected .tar files (from '{pattern}')")
        paths += [Path(match) for match in matches]
    return paths


def _split_key(member: str) -> tuple[str, str]:
    """webdataset's key/extension split: the key is the path up to the first dot of the basename."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _json_caption(data: bytes) -> object:
    """The "caption" (or "text") field of a sample's .json, or None if it has neither or is not JSON."""
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record.get("caption", record.get("text")) if isinstance(record, dict) else None


def _tar_sample(files: dict[str, bytes]) -> _RawSample:
    """One webdataset sample from its files by extension: the first image type found and a .txt or .json caption."""
    image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
    if image is None:
        return _RawSample(skip="sample without image")
    if "txt" in files:
        return _RawSample(image=image, caption=files["txt"].decode("utf-8", errors="replace"))
    return _RawSample(image=image, caption=_json_caption(files["json"]) if "json" in files else None)


def _shard_samples(shard: Path) -> Iterator[_RawSample]:
    """A tar's samples in order, one at a time: a sample's files are consecutive (webdataset writes them so),
    so only one sample's bytes are held. An unreadable or truncated shard keeps what was read before it broke."""
    key, files = None, {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_key(member.name)
                if files and member_key != key:
                    yield _tar_sample(files)
                    files = {}
                key, files[ext] = member_key, tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError):
        yield _RawSample(skip="unreadable shard")
    if files:
        yield _tar_sample(files)


def load_webdataset(shards: str | Path | Sequence[str | Path], resolution: int = 32) -> ImageCaptionSet:
    """Load webdataset .tar shards, the format diffusers' LCM distillation scripts stream.

    Args:
        shards: a path, a brace pattern such as ``data/shard-{000..003}.tar``, a glob, or a list of these.
            Consecutive files in a tar that share a key form one sample: an image (jpg/jpeg/png/webp) and a
            caption in ``.txt`` or in the "caption" or "text" field of ``.json``.
        resolution: side length of the square output images.
    """
    return _collect(_webdataset_source(shards, resolution))


def _webdataset_source(shards: str | Path | Sequence[str | Path], resolution: int) -> SampleSource:
    _check_resolution(resolution)
    patterns = [str(shards)] if isinstance(shards, (str, Path)) else [str(s) for s in shards]
    if not patterns:
        raise DataError(f"webdataset shards {list(shards)!r} is empty; expected {DATASET_KINDS}")
    paths = [path for pattern in patterns for path in _shard_paths(pattern)]
    expected = "tar files of <key>.jpg|jpeg|png|webp with <key>.txt or <key>.json captions"
    return SampleSource(", ".join(patterns), expected, resolution,
                        lambda: (sample for path in paths for sample in _shard_samples(path)), files=paths)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch


def _npz_source(path: str | Path | None, resolution: int) -> SampleSource:
    """An emoji32-format .npz (images, captions), read whole (such sets are small); one that is not readable
    is a DataError."""
    try:
        data = load_emoji32(path)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"dataset '{path}' is not a readable .npz with images and captions ({err})") from err
    name = str(path) if path else "emoji32"
    raws = lambda: (_RawSample(image=image, caption=caption) for image, caption in zip(data.images, data.captions))  # noqa: E731
    return SampleSource(name, "a .npz with images and captions", resolution, raws, files=[Path(path or emoji32_path())])


def _is_shard_spec(spec: str) -> bool:
    """A .tar path, brace pattern or glob: what load_webdataset reads."""
    return spec.endswith(".tar") or bool(_BRACE.search(spec)) or bool(_GLOB_CHARS & set(spec))


def open_dataset(spec: str | Path | None = None, resolution: int = 32, caption_column: str = "text") -> SampleSource:
    """Any supported source, chosen by the form of ``spec``, ready to be read lazily; a source that cannot be
    read at all (missing, wrong kind) is a DataError now, before anything is decoded.

    Args:
        spec: ``"emoji32"`` or None (the shipped set), a folder (imagefolder), a .tar path, brace pattern or
            glob (webdataset shards), or a .npz written like the shipped set.
        resolution: side length of the square output images.
        caption_column: the metadata.jsonl caption field, for image folders.
    """
    _check_resolution(resolution)
    name = None if spec is None else str(spec)
    if name is None or name == "emoji32":
        return _npz_source(None, resolution)
    if Path(name).is_dir():
        return _imagefolder_source(name, resolution, caption_column)
    if name.endswith(".npz") and Path(name).is_file():
        return _npz_source(name, resolution)
    if _is_shard_spec(name):
        return _webdataset_source(name, resolution)
    problem = "does not exist" if not Path(name).exists() else "is not a supported kind"
    raise DataError(f"dataset '{name}' {problem}; expected {DATASET_KINDS}")


def load_dataset(spec: str | Path | None = None, resolution: int = 32, caption_column: str = "text") -> ImageCaptionSet:
    """Load any supported source into memory (arguments as :func:`open_dataset`)."""
    return _collect(open_dataset(spec, resolution, caption_column))
