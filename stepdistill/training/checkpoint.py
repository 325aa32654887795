"""Atomic checkpoints: write into a temporary folder, rename when complete, then prune old ones."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from stepdistill.errors import ConfigError

_NAME = re.compile(r"^checkpoint-(\d+)$")
META_FILE = "stepdistill_checkpoint.json"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, trainer: str, total_limit: int | None) -> Path:
    """Save the full training state at ``step``; the folder appears only once it is complete."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META_FILE).write_text(json.dumps({"step": step, "trainer": trainer}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir: Path, resume_from: str | None, trainer: str) -> tuple[Path, int] | None:
    """Map ``--resume_from_checkpoint`` (``latest`` or a path) to (folder, step); None to start fresh."""
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
    return path, int(meta["step"])
