"""Peak memory and time of turning an image folder into training latents, each way the trainers can:

    python eval/data_memory_probe.py --images 1000 --resolution 256 --output_dir runs/data_memory

``in_memory_set`` is what the trainers did before streaming (``load_dataset`` then one float tensor of every
image, then encode); ``streamed`` is what they do now without a cache; ``cache_write`` and ``cache_read`` use
``--latent_cache_dir`` (its first and a later start). Each runs in its own process, beside a ``baseline`` that
only loads the pipeline; the table gives each process's peak resident memory above that baseline. The images
are smooth random JPEGs (1.25x the resolution, so the resize runs) and the VAE is the testbed's tiny
architecture told to take that resolution: what is measured is the data path, not a real VAE's activations.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("baseline", "in_memory_set", "streamed", "cache_write", "cache_read")


def write_folder(root: Path, count: int, resolution: int) -> None:
    """``count`` smooth random JPEGs with captions, in the imagefolder layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    side = resolution * 5 // 4
    lines = []
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((side, side), Image.BICUBIC).save(root / f"{i:06d}.jpg", quality=90)
        lines.append(json.dumps({"file_name": f"{i:06d}.jpg", "text": f"pattern {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def teacher_for(resolution: int, folder: Path):
    from stepdistill.teacher import TeacherWrapper
    from stepdistill.testbed import tiny_models
    from stepdistill.testbed.teacher_training import build_pipeline
    from stepdistill.testbed.tokenizer import write_caption_tokenizer

    import torch

    torch.manual_seed(0)  # the same VAE in every process, so the cache written by one is the next one's
    vae = tiny_models.tiny_vae()
    vae.register_to_config(sample_size=resolution)
    return TeacherWrapper(build_pipeline("sd", vae, write_caption_tokenizer(["pattern"], folder / "tokenizer")))


def worker(mode: str, folder: Path, resolution: int, work: Path) -> dict:
    """Run one mode in this process; its peak RSS and seconds."""
    import torch

    from stepdistill.data import load_dataset, open_dataset
    from stepdistill.methods.latent_cache import cached_latents
    from stepdistill.methods.latent_data import LatentPromptData, encode_samples

    torch.set_num_threads(2)
    teacher = teacher_for(resolution, work)
    start = time.perf_counter()
    count = 0
    if mode == "in_memory_set":
        count = len(LatentPromptData.from_images(teacher, load_dataset(folder, resolution)))
    elif mode == "streamed":
        count = len(encode_samples(teacher, open_dataset(folder, resolution).samples(), resolution, show_progress=False)[2])
    elif mode.startswith("cache"):
        latents, _ = cached_latents(teacher, open_dataset(folder, resolution), work / "latents")
        count = len(latents[list(range(len(latents)))])  # read every row once
    return {"mode": mode, "images": count, "seconds": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--output_dir", default="runs/data_memory")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.output_dir)
    folder = out / "images"
    if args.worker:
        print(json.dumps(worker(args.worker, folder, args.resolution, out)))
        return
    if args.images < 1 or args.resolution < 8:
        sys.exit(f"error: --images {args.images} / --resolution {args.resolution}: need at least 1 image of 8 px")
    if (out / "latents").exists() or folder.exists():
        sys.exit(f"error: output_dir '{out}' already holds a probe; pass another folder")
    write_folder(folder, args.images, args.resolution)
    rows = []
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--worker", mode, "--images", str(args.images), "--resolution",
                               str(args.resolution), "--output_dir", str(out)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]["peak_rss_mb"]
    table = [f"{args.images} images of {args.resolution} px (JPEG, from {args.resolution * 5 // 4} px)", "",
             "| mode | peak RSS above the baseline | seconds |", "|---|---|---|"]
    table += [f"| {r['mode']} | {r['peak_rss_mb'] - base:.0f} MB | {r['seconds']:.1f} |" for r in rows[1:]]
    (out / "data_memory.md").write_text("\n".join(table) + "\n")
    (out / "data_memory.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(table))


if __name__ == "__main__":
    main()
