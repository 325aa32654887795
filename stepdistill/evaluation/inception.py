"""Inception-v3 features for FID/KID on real datasets, through clean-fid, strictly offline.

clean-fid looks for ``inception-2015-12-05.pt`` in /tmp and downloads it otherwise; here nothing is
downloaded. Put the file at ``$STEPDISTILL_INCEPTION_WEIGHTS`` (or /tmp/inception-2015-12-05.pt) on
machines without internet; the testbed uses its own evaluator instead.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from stepdistill.errors import ModelError

CLEANFID_LOCATION = Path("/tmp/inception-2015-12-05.pt")


def inception_weights_path() -> Path:
    """Where the Inception weights are expected (environment variable first, then clean-fid's default)."""
    return Path(os.environ.get("STEPDISTILL_INCEPTION_WEIGHTS", CLEANFID_LOCATION))


def inception_feature_extractor(device: torch.device | str = "cpu"):
    """clean-fid's Inception feature extractor, or a one-line error saying where the weights must go."""
    path = inception_weights_path()
    if not path.is_file():
        raise ModelError(f"Inception weights not found at {str(path)!r}; copy clean-fid's inception-2015-12-05.pt there "
                         "(or set STEPDISTILL_INCEPTION_WEIGHTS), or use --feature_extractor emoji for the testbed")
    if path != CLEANFID_LOCATION and not CLEANFID_LOCATION.exists():
        shutil.copyfile(path, CLEANFID_LOCATION)  # clean-fid only reads from its own location
    from cleanfid.features import build_feature_extractor

    return build_feature_extractor("clean", torch.device(device))
