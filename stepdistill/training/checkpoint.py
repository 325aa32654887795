"""Atomic checkpoints: write into a temporary folder, rename when complete, then prune old ones."""
from __future__ import annotations

import errno
import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stepdistill.errors import ConfigError, DiskFullError
from stepdistill.training.deepspeed_setup import engine_save_options

_NAME = re.compile(r"^checkpoint-(\d+)$")
META_FILE = "stepdistill_checkpoint.json"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _aside(folder: Path) -> Path:
    """The temporary name a folder is renamed to before it is deleted (resume and exports ignore it); a
    leftover of an earlier kill under that name is cleared first."""
    doomed = folder.parent / f".tmp-removing-{folder.name}"
    if doomed.exists():
        shutil.rmtree(doomed)
    return doomed


def remove_checkpoint(folder: Path) -> None:
    """Delete a folder so that a kill at any moment leaves either all of it or nothing under its name."""
    doomed = _aside(folder)
    folder.rename(doomed)
    shutil.rmtree(doomed)


def swap_into_place(tmp: Path, final: Path) -> None:
    """Give the complete folder ``tmp`` the name ``final``; an existing ``final`` is renamed aside first and
    deleted afterwards, so no kill leaves half a folder under ``final``."""
    doomed = _aside(final)
    if final.exists():
        final.rename(doomed)
    tmp.rename(final)
    if doomed.exists():
        shutil.rmtree(doomed)


def is_disk_full(err: BaseException) -> bool:
    """Whether a write failed for want of space. safetensors' writer reports ENOSPC only in its message."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or "(os error 28)" in str(err)


@contextmanager
def removed_unless_finished(tmp: Path, what: str, then: str) -> Iterator[None]:
    """Delete the temporary folder ``tmp`` when writing it fails, since a half-written copy on a full disk would
    keep it full; a full disk becomes a one-line :class:`DiskFullError` naming ``what`` and what to do ``then``."""
    try:
        yield
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise DiskFullError(f"no space left on device while writing {what}; the partial copy was removed and "
                                f"{then}") from err
        raise


def _clear_removal_leftovers(output_dir: Path) -> None:
    """Folders a killed run left half-deleted (see :func:`remove_checkpoint`)."""
    for leftover in output_dir.glob(".tmp-removing-checkpoint-*"):
        shutil.rmtree(leftover)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, trainer: str, total_limit: int | None,
                    extra_objects: list[Any] = (), identity: dict[str, str] | None = None) -> Path:
    """Save the full training state at ``step``; the folder appears only once it is complete. ``identity``
    holds resolved settings that change what the weights mean (see :func:`resolve_resume`)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        _clear_removal_leftovers(output_dir)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    kept = "the earlier checkpoints are kept: free some space, then rerun with --resume_from_checkpoint latest"
    with removed_unless_finished(tmp, f"checkpoint-{step} into {str(output_dir)!r}", kept):
        accelerator.save_state(str(tmp), **engine_save_options(accelerator))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_extra_states(list(extra_objects), tmp)
            (tmp / META_FILE).write_text(json.dumps({"step": step, "trainer": trainer, "identity": identity or {}}))
    if accelerator.is_main_process:
        swap_into_place(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir: Path, resume_from: str | None, trainer: str,
                   identity: dict[str, str] | None = None) -> tuple[Path, int] | None:
    """Map ``--resume_from_checkpoint`` (``latest`` or a path) to (folder, step); None to start fresh.

    A setting in ``identity`` that differs from the checkpoint's is refused: the weights would load without
    complaint and be read another way (a v-output student sampled as epsilon)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(resume_from)
        if not (path / META_FILE).is_file():
            raise ConfigError(f"resume_from_checkpoint={resume_from!r} is not a complete stepdistill checkpoint; "
                              "give 'latest' or a checkpoint-<step> folder")
    meta = json.loads((path / META_FILE).read_text())
    if meta["trainer"] != trainer:
        raise ConfigError(f"checkpoint {str(path)!r} was written by trainer {meta['trainer']!r}, not {trainer!r}")
    for key, saved in meta.get("identity", {}).items():  # checkpoints older than identities have none
        now = (identity or {}).get(key)
        if now is not None and now != saved:
            raise ConfigError(f"checkpoint {str(path)!r} was trained with {key}={saved!r} but this run has "
                              f"{key}={now!r}; pass --{key} {saved} to resume it, or start a new output_dir")
    return path, int(meta["step"])


def _split_state(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON skeleton of a state dict with every tensor moved into ``tensors`` under a path key."""
    if torch.is_tensor(value):
        key = prefix or "value"
        tensors[key] = value.detach().cpu().clone().contiguous()  # no shared storage (safetensors refuses it)
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[k, _split_state(v, tensors, f"{prefix}/{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_split_state(v, tensors, f"{prefix}/{i}") for i, v in enumerate(value)]}
    return value


def _join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: _join_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, dict) and "__list__" in skeleton:
        return [_join_state(v, tensors) for v in skeleton["__list__"]]
    return skeleton


def save_extra_states(objects: list[Any], folder: Path) -> None:
    """State of objects outside accelerate's models/optimizers (EMA, target networks) as safetensors plus a
    JSON skeleton, instead of accelerate's pickled custom checkpoints that load with weights_only=False."""
    for index, obj in enumerate(objects):
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _split_state(obj.state_dict(), tensors, "")
        save_file(tensors, str(folder / f"extra_state_{index}.safetensors"), metadata={"skeleton": json.dumps(skeleton)})


def load_extra_states(objects: list[Any], folder: Path) -> None:
    """Inverse of :func:`save_extra_states`; refuses a checkpoint that lacks one of the objects."""
    for index, obj in enumerate(objects):
        path = folder / f"extra_state_{index}.safetensors"
        if not path.is_file():
            raise ConfigError(f"checkpoint {str(folder)!r} has no {path.name}; it was written by another configuration")
        with safe_open(str(path), framework="pt") as handle:
            skeleton = json.loads(handle.metadata()["skeleton"])
        obj.load_state_dict(_join_state(skeleton, load_file(str(path))))
