"""FID and KID on any feature space, using clean-fid's own formulas (Heusel et al. 2017; Binkowski et al. 2018)."""
from __future__ import annotations

import numpy as np
import torch
from cleanfid.fid import frechet_distance, kernel_distance


def _np(features: torch.Tensor | np.ndarray) -> np.ndarray:
    return features.detach().double().cpu().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)


def fid_from_features(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples)."""
    a, b = _np(real), _np(fake)
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def kid_from_features(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, num_subsets: int = 100,
                      max_subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel inception distance with a cubic polynomial kernel; clean-fid draws subsets with the global
    NumPy RNG, so it is seeded here and the caller's RNG state is restored afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return kernel_distance(_np(real), _np(fake), num_subsets=num_subsets, max_subset_size=max_subset_size)
    finally:
        np.random.set_state(state)


def paired_kid_from_features(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray) -> float:
    """KID for label-aligned sets (row k of both shows prompt k): the unbiased MMD^2 U-statistic over pairs
    i != j (Gretton et al. 2012, eq. 3) with KID's cubic kernel.

    clean-fid's estimator assumes two independent samples. On the testbed every prompt is its own class
    and each set holds each class once, so its within-set sums (diagonal dropped) never compare an image
    with its own class while its cross sum does (real k vs generated k); with a class-sensitive feature
    space that makes a good generator's KID strongly negative. Dropping the matched pairs from the cross
    sum as well compares only different prompts everywhere: identical sets give exactly 0."""
    x, y = _np(real), _np(fake)
    if x.shape != y.shape:
        raise ValueError(f"paired KID needs label-aligned sets of equal shape, got {x.shape} and {y.shape}")
    m, d = x.shape
    if m < 2:
        raise ValueError(f"paired KID needs at least 2 pairs, got {m}")
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    h = kxx + kyy - kxy - kxy.T
    return float((h.sum() - np.trace(h)) / (m * (m - 1)))
