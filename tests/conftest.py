"""Shared fixtures: tiny random pipelines of the real diffusers classes (fast, untrained)."""
from __future__ import annotations

import os

import pytest
import torch

from stepdistill.training.side_thread import cores_per_process

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _pin_xdist_worker() -> None:
    """pytest-xdist runs the tests in several worker processes: give each its own share of the cores, so the
    trainers (which size their threads from the process's affinity) do not oversubscribe them."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    index = int(worker.removeprefix("gw"))
    os.sched_setaffinity(0, cores[index::count] or [cores[index % len(cores)]])


_pin_xdist_worker()
torch.set_num_threads(min(2, cores_per_process()))

CAPTIONS = ["hamster face", "red apple", "rocket", "grinning face", "sun", "fire", "snowman", "banana"]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from stepdistill.testbed.tokenizer import write_caption_tokenizer

    return write_caption_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tok"))


def _random_pipe(kind: str, tokenizer):
    from stepdistill.testbed import tiny_models
    from stepdistill.testbed.teacher_training import build_pipeline

    torch.manual_seed(0)
    pipe = build_pipeline(kind, tiny_models.tiny_vae(), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe_fixture(kind: str):
    """A session fixture holding one tiny random pipeline of ``kind`` (see testbed.teacher_training)."""
    @pytest.fixture(scope="session")
    def pipe(tokenizer):
        return _random_pipe(kind, tokenizer)
    return pipe


sd_pipe = _pipe_fixture("sd")
sd3_pipe = _pipe_fixture("sd3")
sd3_t5_pipe = _pipe_fixture("sd3_t5")  # SD3 with its T5 encoder
sdxl_pipe = _pipe_fixture("sdxl")
pixart_pipe = _pipe_fixture("pixart")
flux_pipe = _pipe_fixture("flux")  # FLUX.1-schnell's layout: guided in two passes
flux_dev_pipe = _pipe_fixture("flux_dev")  # FLUX.1-dev's: a guidance embedding


@pytest.fixture(scope="session")
def random_teachers(tmp_path_factory, sd_pipe, sd3_pipe, sdxl_pipe, pixart_pipe, flux_pipe, flux_dev_pipe):
    """The random SD, SD3, SDXL, PixArt-Sigma and both Flux pipelines saved as folders, the way a trainer
    receives a teacher."""
    root = tmp_path_factory.mktemp("teachers")
    for name, pipe in (("sd", sd_pipe), ("sd3", sd3_pipe), ("sdxl", sdxl_pipe), ("pixart", pixart_pipe), ("flux", flux_pipe),
                       ("flux_dev", flux_dev_pipe)):
        pipe.save_pretrained(root / name)
    return root
