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
