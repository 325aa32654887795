"""Datasets read lazily and encoded chunk by chunk, the on-disk latent cache, and the bounded prompt cache."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import stepdistill.data.loaders as loaders
import stepdistill.methods.latent_cache as latent_cache
import stepdistill.methods.latent_data as latent_data
from stepdistill.data import load_emoji32, load_imagefolder, open_dataset
from stepdistill.errors import ConfigError, DataError
from stepdistill.methods.latent_cache import cache_key, cached_latents
from stepdistill.methods.latent_data import LatentPromptData, encode_samples
from stepdistill.prompt_cache import PromptCache
from stepdistill.teacher import TeacherWrapper, load_teacher


def emoji_folder(root: Path, count: int = 20, broken: bool = False) -> Path:
    """``count`` emoji32 images as PNGs with a metadata.jsonl; ``broken`` adds an unreadable file and an empty caption."""
    data = load_emoji32()
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        Image.fromarray(data.images[i]).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": data.captions[i]}))
    if broken:
        (root / "bad.png").write_bytes(b"not a png")
        lines.insert(3, json.dumps({"file_name": "bad.png", "text": "broken"}))
        lines.insert(7, json.dumps({"file_name": "000.png", "text": " "}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def teacher(sd_pipe):
    return TeacherWrapper(sd_pipe)


def test_streamed_encode_reads_a_chunk_at_a_time_and_equals_the_in_memory_encode(teacher, tmp_path, monkeypatch):
    folder = emoji_folder(tmp_path / "ds")
    decoded, seen_at_encode = [], []
    decode = loaders._decode
    monkeypatch.setattr(loaders, "_decode", lambda *a: decoded.append(1) or decode(*a))
    encode = teacher.pipe.vae.encode
    monkeypatch.setattr(teacher.pipe.vae, "encode", lambda x: seen_at_encode.append(len(decoded)) or encode(x))
    monkeypatch.setattr(latent_data, "ENCODE_PIXEL_BUDGET", 8 * 32 * 32)  # chunks of 8 images
    positions, latents, captions = encode_samples(teacher, open_dataset(folder).samples(), 32, show_progress=False)
    assert seen_at_encode == [8, 16, 20]  # never more than one chunk decoded ahead of the encoder
    reference = LatentPromptData.from_images(teacher, load_imagefolder(folder))
    assert positions == list(range(20)) and captions == reference.captions
    torch.testing.assert_close(latents, reference.latents, atol=1e-5, rtol=1e-5)


def test_a_process_reads_only_its_share(tmp_path):
    source = open_dataset(emoji_folder(tmp_path / "ds", 7))
    shares = [[position for position, _, _ in source.samples(rank, 3)] for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]


def test_the_cache_is_written_once_then_read_memory_mapped(teacher, tmp_path, monkeypatch):
    folder = emoji_folder(tmp_path / "ds", broken=True)
    with pytest.warns(UserWarning, match=r"skipped 2 samples \(1 unreadable image, 1 empty caption\); kept 20"):
        latents, captions = cached_latents(teacher, open_dataset(folder), tmp_path / "cache")
    with pytest.warns(UserWarning, match="skipped 2 samples"):
        reference = LatentPromptData.from_images(teacher, load_imagefolder(folder))
    assert captions == reference.captions and len(latents) == 20
    torch.testing.assert_close(latents[list(range(20))], reference.latents, atol=1e-5, rtol=1e-5)
    (entry,) = (tmp_path / "cache").iterdir()  # one finished cache, no partial folder left
    assert (entry / "info.json").is_file() and isinstance(latents.parts[0], np.memmap)

    monkeypatch.setattr(teacher.pipe.vae, "encode", lambda x: pytest.fail("a finished cache was encoded again"))
    with pytest.warns(UserWarning, match="skipped 2 samples"):  # the counts are kept with the cache
        again, captions_again = cached_latents(teacher, open_dataset(folder), tmp_path / "cache")
    assert captions_again == captions
    torch.testing.assert_close(again[[5, 0, 19]], reference.latents[[5, 0, 19]], atol=1e-5, rtol=1e-5)
    data = LatentPromptData(teacher, again, captions_again)
    batch_latents, embeds = data.batch([2, 3], torch.device("cpu"))
    assert batch_latents.shape == (2, 4, 8, 8) and len(embeds) == 2


def test_the_cache_key_follows_the_data_and_the_encoder_only(teacher, tmp_path):
    folder = emoji_folder(tmp_path / "ds", 4)
    key = cache_key(teacher, open_dataset(folder), "text")
    assert cache_key(teacher, open_dataset(folder), "alt") != key
    assert cache_key(teacher, open_dataset(folder, resolution=16), "text") != key
    vae = teacher.pipe.vae
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # the decoder makes no latent
        assert cache_key(teacher, open_dataset(folder), "text") == key
        vae.encoder.conv_in.bias.add_(1e-3)
        assert cache_key(teacher, open_dataset(folder), "text") != key
        vae.encoder.conv_in.bias.sub_(1e-3)
        vae.decoder.conv_out.bias.sub_(1.0)
    with open(folder / "metadata.jsonl", "a") as lines:
        lines.write(json.dumps({"file_name": "000.png", "text": "again"}) + "\n")
    assert cache_key(teacher, open_dataset(folder), "text") != key


def test_the_key_ignores_diffusers_bookkeeping_in_the_vae_config(teacher, tmp_path, monkeypatch):
    """diffusers keeps a set's order in ``_use_default_values``, which changes with each process's hash seed;
    a key that read it made every start of the memory probe encode again."""
    from diffusers.configuration_utils import FrozenDict

    source = open_dataset(emoji_folder(tmp_path / "ds", 2))
    vae = teacher.pipe.vae
    key = cache_key(teacher, source, "text")
    shuffled = FrozenDict({**vae.config, "_use_default_values": ["b", "a"], "_name_or_path": "/moved/vae"})
    monkeypatch.setattr(vae, "_internal_dict", shuffled)
    assert vae.config["_name_or_path"] == "/moved/vae" and cache_key(teacher, source, "text") == key
    monkeypatch.setattr(vae, "_internal_dict", FrozenDict({**vae.config, "scaling_factor": 0.5}))
    assert cache_key(teacher, source, "text") != key


def test_an_interrupted_encode_leaves_no_cache_that_looks_finished(teacher, tmp_path, monkeypatch):
    folder = emoji_folder(tmp_path / "ds", 6)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(latent_cache.np, "save", fail)
        with pytest.raises(KeyboardInterrupt):
            cached_latents(teacher, open_dataset(folder), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/info.json"))
    latents, captions = cached_latents(teacher, open_dataset(folder), tmp_path / "cache")
    assert len(latents) == len(captions) == 6


def test_a_cache_folder_that_cannot_be_one_is_refused_in_one_line(teacher, tmp_path):
    from stepdistill.methods.lcm import LCMConfig

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"latent_cache_dir '{blocker}' is a file; expected a folder"):
        LCMConfig(latent_cache_dir=str(blocker)).validate()
    with pytest.raises(DataError, match=r"latent cache folder '.*file/sub' cannot be written") as err:
        cached_latents(teacher, open_dataset(emoji_folder(tmp_path / "ds", 2)), blocker / "sub")
    assert "\n" not in str(err.value)


def test_a_source_with_nothing_usable_is_refused_with_the_cache_too(teacher, tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "missing.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"has no readable images \(skipped 1 samples \(1 missing file\)\)"):
        cached_latents(teacher, open_dataset(folder), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/info.json"))


def test_two_processes_encode_half_each_and_read_the_same_cache(random_teachers, tmp_path):
    """Each of 2 gloo processes encodes every other sample; both then read all of them, in source order."""
    folder = emoji_folder(tmp_path / "ds", 9)
    script = tmp_path / "encode.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from accelerate import PartialState
        from stepdistill.data import open_dataset
        from stepdistill.methods.latent_cache import cached_latents
        from stepdistill.teacher import load_teacher

        teacher = load_teacher({str(random_teachers / "sd")!r})
        latents, captions = cached_latents(teacher, open_dataset({str(folder)!r}), {str(tmp_path / "cache")!r})
        torch.save(latents[list(range(len(latents)))], {str(tmp_path)!r} + f"/read-{{PartialState().process_index}}.pt")
    """))
    from method_runs import run_ok, two_process_launch

    run_ok([*two_process_launch("torchrun", 29543), str(script)])
    (entry,) = (tmp_path / "cache").iterdir()
    parts = [json.loads((entry / f"part-{r:05d}-of-00002.json").read_text())["positions"] for r in range(2)]
    assert parts == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    read = [torch.load(tmp_path / f"read-{r}.pt", weights_only=True) for r in range(2)]
    reference = LatentPromptData.from_images(load_teacher(random_teachers / "sd"), load_imagefolder(folder))
    for latents in read:  # other chunks than the reference's: float-order noise only
        torch.testing.assert_close(latents, reference.latents, atol=1e-4, rtol=1e-4)


def test_training_from_the_cache_equals_training_in_memory(random_teachers, tmp_path):
    """The trainers' --latent_cache_dir gives the same batches, so the same losses, as encoding in memory."""
    from method_runs import run_ok, script_command

    script, options = script_command("train_lcm.py", random_teachers / "sd", tmp_path,
                                     ["--max_train_steps", "2", "--train_batch_size", "4", "--lora_rank", "4"])
    losses = []
    for run, extra in (("memory", []), ("cached", ["--latent_cache_dir", str(tmp_path / "latents")])):
        done = run_ok([sys.executable, script, *options, *extra, "--output_dir", str(tmp_path / run)])
        losses.append(float(done.stdout.split("final loss ")[1].split(";")[0]))
    assert losses[0] == losses[1]
    assert len(list((tmp_path / "latents").glob("*/info.json"))) == 1


# prompt cache


def test_the_prompt_cache_keeps_to_its_budget_and_the_empty_prompt(teacher):
    one = teacher.encode_uncached(["rocket"])[0]
    size = one.hidden.numel() * 4
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return teacher.encode_uncached(prompts)

    cache = PromptCache(max_bytes=2 * size)
    first = cache.lookup(["", "rocket", "sun", "rocket"], encode)
    assert calls == [["", "rocket", "sun"]] and cache.bytes == 2 * size
    cache.lookup(["moon"], encode)  # evicts the least recently used, "rocket"
    cache.lookup(["sun", "", "rocket"], encode)
    assert calls[1:] == [["moon"], ["rocket"]] and cache.bytes <= 2 * size
    torch.testing.assert_close(first[1].hidden, cache.lookup(["rocket"], encode)[0].hidden)
    nothing = PromptCache(max_bytes=0)
    nothing.lookup(["", "rocket"], encode)
    nothing.lookup(["", "rocket"], encode)
    assert calls[-2:] == [["", "rocket"], ["rocket"]] and len(nothing) == 1


def test_prompt_cache_and_caption_options_reach_the_trainer(random_teachers, tmp_path):
    from stepdistill.methods.common import load_teacher_and_data
    from stepdistill.methods.lcm import LCMConfig

    folder = emoji_folder(tmp_path / "ds", 4)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({**r, "prompt": r["text"].upper()}) for r in lines) + "\n")
    cfg = LCMConfig(pretrained_teacher_model=str(random_teachers / "sd"), dataset=str(folder), caption_column="prompt",
                    prompt_cache_mb=1)
    teacher, data = load_teacher_and_data(cfg)
    assert teacher.prompt_cache.max_bytes == 1 << 20 and data.captions == [r["text"].upper() for r in lines]
    with pytest.raises(ConfigError, match="prompt_cache_mb=-1 must be 0"):
        LCMConfig(prompt_cache_mb=-1).validate()
