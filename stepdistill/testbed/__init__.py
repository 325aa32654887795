"""The offline testbed: emoji32 data, a caption tokenizer and tiny SD / SD3 teachers shipped in the package."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED_TEACHERS = {"tiny-sd": "StableDiffusionPipeline", "tiny-sd3": "StableDiffusion3Pipeline"}


def shipped_teacher_path(name: str = "tiny-sd") -> Path:
    """Folder of a shipped testbed teacher (a save_pretrained pipeline folder inside the package)."""
    from stepdistill.errors import ModelError

    if name not in SHIPPED_TEACHERS:
        raise ModelError(f"shipped teacher {name!r} does not exist; choose one of {', '.join(SHIPPED_TEACHERS)}")
    return Path(str(resources.files("stepdistill.testbed") / "assets" / name))


def resolve_teacher_path(spec: str | Path) -> Path:
    """A shipped teacher name ('tiny-sd', 'tiny-sd3') or any pipeline folder path."""
    return shipped_teacher_path(str(spec)) if str(spec) in SHIPPED_TEACHERS else Path(spec)
