"""Train a testbed teacher: ``--stage vae`` (the tiny AutoencoderKL), then ``--stage denoiser``.

    python train_scripts/train_teacher.py --config configs/teacher_vae.yaml
    python train_scripts/train_teacher.py --config configs/teacher_sd.yaml     # UNet, epsilon, DDIM
    python train_scripts/train_teacher.py --config configs/teacher_sd3.yaml    # MMDiT, flow matching

Both stages resume with ``--resume_from_checkpoint latest``. The denoiser stage writes a pipeline folder
(``<output_dir>/pipeline``) that ``StableDiffusionPipeline`` / ``StableDiffusion3Pipeline.from_pretrained``
loads like any Hub model.
"""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL

from stepdistill.config import parse_cli, to_dict
from stepdistill.data import load_dataset
from stepdistill.errors import ModelError, cli_errors
from stepdistill.testbed import SHIPPED_TEACHERS, resolve_teacher_path
from stepdistill.testbed.teacher_training import DenoiserMethod, VaeMethod
from stepdistill.testbed.tokenizer import write_caption_tokenizer
from stepdistill.training.loop import LoopConfig, final_loss_text, run_training


@dataclass
class TeacherConfig(LoopConfig):
    """Loop options plus what the testbed teacher needs."""

    stage: Literal["vae", "denoiser"] = "denoiser"  # which network this run trains
    kind: Literal["sd", "sd3"] = "sd"  # denoiser stage: UNet/epsilon (sd) or MMDiT/flow (sd3)
    dataset: str | None = None  # emoji32 (default), an image folder with metadata.jsonl, webdataset shards or a .npz
    vae_path: str = "runs/testbed_vae/vae"  # denoiser stage: VAE folder from the vae stage, or a shipped teacher name (its VAE)
    caption_dropout: float = 0.1  # probability of training on the empty prompt (for CFG)
    ema_decay: float = 0.999  # EMA decay of the exported denoiser weights
    kl_weight: float = 1e-6  # vae stage: KL term weight


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(TeacherConfig, argv)
    data = load_dataset(cfg.dataset)
    if cfg.stage == "vae":
        method = VaeMethod(data, kl_weight=cfg.kl_weight, seed=cfg.seed)
    else:
        vae_path = resolve_teacher_path(cfg.vae_path) / "vae" if cfg.vae_path in SHIPPED_TEACHERS else Path(cfg.vae_path)
        if not (vae_path / "config.json").is_file():
            raise ModelError(f"vae_path={cfg.vae_path!r} is not a VAE folder; run the vae stage first "
                             "(configs/teacher_vae.yaml) or point at its <output_dir>/vae")
        vae = AutoencoderKL.from_pretrained(vae_path, dtype=torch.float32).eval().requires_grad_(False)
        with tempfile.TemporaryDirectory() as tmp:  # the pipeline export saves the tokenizer files
            tokenizer = write_caption_tokenizer(data.captions, tmp)
        method = DenoiserMethod(cfg.kind, data, vae, tokenizer, caption_dropout=cfg.caption_dropout,
                                ema_decay=cfg.ema_decay, seed=cfg.seed)
    logs = run_training(method, cfg, tracker_config=to_dict(cfg))
    print(f"done: {method.name} {final_loss_text(logs, 4)}; result in {cfg.output_dir}/{method.export_name}")


if __name__ == "__main__":
    sys.exit(main())
