"""An on-disk cache of a dataset's latents: encoded once, each process its share of the samples, then read
memory-mapped by every process (the page cache holds one copy per machine), and reused by later runs and
resumes while the dataset files, resolution, caption field and VAE encoder are unchanged.

Layout: ``<cache_dir>/<key>/`` holds ``info.json`` and, per process of the run that wrote it,
``part-<rank>-of-<world>.npy`` (float32 latents) with ``.json`` (source positions, captions, skip counts).
A run writes into ``<key>.partial-w<world>/`` and renames it when every part is there, so an interrupted
encode never leaves a cache that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from stepdistill.data.loaders import SampleSource
from stepdistill.errors import DataError
from stepdistill.methods.latent_data import encode_samples
from stepdistill.teacher import TeacherWrapper

if TYPE_CHECKING:
    from accelerate import PartialState

CACHE_FORMAT = 1
INFO_FILE = "info.json"


def _encoder_tensors(vae: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weights that make a latent: the encoder and its quantising convolution (all weights if none match)."""
    state = vae.state_dict()
    encoder = [(name, t) for name, t in state.items() if name.startswith(("encoder.", "quant_conv."))]
    return sorted(encoder or state.items())


def vae_settings(vae: torch.nn.Module) -> dict:
    """The VAE's configuration without diffusers' bookkeeping entries (``_use_default_values`` is a set's
    order, which differs from process to process; ``_name_or_path`` changes when a folder moves)."""
    return {key: value for key, value in vae.config.items() if not key.startswith("_")}


def cache_key(teacher: TeacherWrapper, source: SampleSource, caption_column: str) -> str:
    """A hex digest of everything the cached latents and captions depend on."""
    vae = teacher.pipe.vae
    files = [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in source.files]
    described = {"format": CACHE_FORMAT, "source": source.name, "files": files, "resolution": source.resolution,
                 "caption_column": caption_column, "vae": vae_settings(vae), "vae_class": type(vae).__name__,
                 "flow": teacher.schedule.kind == "flow"}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    for name, tensor in _encoder_tensors(vae):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


class StoredLatents:
    """Latent rows of a finished cache, memory-mapped, in the order of their positions in the source."""

    def __init__(self, folder: Path, source: SampleSource):
        info = json.loads((folder / INFO_FILE).read_text())
        self.parts = [np.load(folder / f"{part}.npy", mmap_mode="r") for part in info["parts"]]
        metas = [json.loads((folder / f"{part}.json").read_text()) for part in info["parts"]]
        positions = np.concatenate([np.asarray(meta["positions"], dtype=np.int64) for meta in metas])
        where = np.concatenate([np.stack([np.full(len(m["positions"]), i), np.arange(len(m["positions"]))], 1)
                                for i, m in enumerate(metas)])
        order = np.argsort(positions, kind="stable")
        self.where = where[order]
        captions = [caption for meta in metas for caption in meta["captions"]]
        self.captions = [captions[i] for i in order]
        source.finish(kept=len(self.captions), skipped=Counter(info["skipped"]))

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.parts[part][row] for part, row in self.where[indices]]))


def _write_part(partial: Path, part: str, positions: list[int], latents: torch.Tensor, captions: list[str],
                skipped: Counter[str]) -> None:
    """One process's share, each file written under a temporary name and renamed into place."""
    array, meta = partial / f"{part}.npy", partial / f"{part}.json"
    with open(f"{array}.tmp", "wb") as handle:
        np.save(handle, latents.numpy().astype(np.float32))
    Path(f"{meta}.tmp").write_text(json.dumps({"positions": positions, "captions": captions, "skipped": dict(skipped)}))
    os.replace(f"{array}.tmp", array)
    os.replace(f"{meta}.tmp", meta)


def _read_parts(partial: Path, parts: list[str]) -> tuple[int, Counter[str]]:
    """Samples kept and skipped over every process's share; a share that is not visible here is a DataError."""
    kept, skipped = 0, Counter()
    for part in parts:
        meta = partial / f"{part}.json"
        if not meta.is_file():
            raise DataError(f"latent cache part '{meta}' is missing: --latent_cache_dir must be a folder every "
                            "process of the run can see (shared storage on several machines)")
        record = json.loads(meta.read_text())
        kept, skipped = kept + len(record["captions"]), skipped + Counter(record["skipped"])
    return kept, skipped


def cached_latents(teacher: TeacherWrapper, source: SampleSource, cache_dir: str | Path,
                   caption_column: str = "text") -> tuple[StoredLatents, list[str]]:
    """The source's latents and captions from ``cache_dir``, encoding them first if no finished cache matches.
    Every process of the run calls this; each encodes the samples at its rank modulo the process count."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # as the training loop's Accelerator will
    folder = Path(cache_dir) / cache_key(teacher, source, caption_column)
    if not (folder / INFO_FILE).is_file():
        _build(teacher, source, folder, state)
    stored = StoredLatents(folder, source)
    return stored, stored.captions


def _build(teacher: TeacherWrapper, source: SampleSource, folder: Path, state: PartialState) -> None:
    rank, world = state.process_index, state.num_processes
    partial = folder.with_name(f"{folder.name}.partial-w{world}")
    parts = [f"part-{r:05d}-of-{world:05d}" for r in range(world)]
    try:
        partial.mkdir(parents=True, exist_ok=True)
        positions, latents, captions = encode_samples(teacher, source.samples(rank, world), source.resolution,
                                                      show_progress=state.is_main_process)
        _write_part(partial, parts[rank], positions, latents, captions, source.skipped)
    except OSError as err:  # unwritable or full: one line, and no cache that looks finished
        raise DataError(f"latent cache folder '{partial.parent}' cannot be written ({err.strerror or err}); "
                        "pass a writable --latent_cache_dir with room for the latents") from err
    state.wait_for_everyone()
    kept, skipped = _read_parts(partial, parts)
    if not kept:
        source.finish(kept=0, skipped=skipped)  # every process raises alike; the skip warning comes when reading
    if state.is_main_process:
        info = {"format": CACHE_FORMAT, "source": source.name, "count": kept, "skipped": dict(skipped), "parts": parts}
        (partial / INFO_FILE).write_text(json.dumps(info, indent=1))
        if folder.exists():  # another run finished the same cache meanwhile
            shutil.rmtree(partial)
        else:
            os.replace(partial, folder)
    state.wait_for_everyone()
