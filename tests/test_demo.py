"""The Gradio demo (a pipeline student and an LCM-LoRA student): its functions called directly, the served app driven with gradio_client (20 concurrent
requests included), and the page loaded in headless Chromium with the images on screen."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from stepdistill.demo.app import generate, launch  # noqa: E402
from stepdistill.demo.backend import DemoBackend, DemoInputError, find_latest_student  # noqa: E402
from stepdistill.teacher import load_teacher  # noqa: E402
from stepdistill.testbed import shipped_teacher_path  # noqa: E402


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A pipeline folder with student metadata (the teacher itself, run unguided), as the trainers export."""
    folder = tmp_path_factory.mktemp("runs") / "pd" / "pipeline"
    load_teacher(shipped_teacher_path("tiny-sd")).pipe.save_pretrained(folder)
    (folder / "stepdistill_student.json").write_text(json.dumps({"method": "progressive", "guidance_scale": 1.0}))
    return folder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """A real LCM-LoRA export of tiny-sd (two training steps: the demo only needs it to load and run)."""
    from stepdistill.data.emoji32 import load_emoji32
    from stepdistill.methods.latent_data import LatentPromptData
    from stepdistill.methods.lcm import LCMConfig, LCMMethod
    from stepdistill.training.loop import run_training

    out = tmp_path_factory.mktemp("lcm")
    cfg = LCMConfig(output_dir=str(out), max_train_steps=2, train_batch_size=4, report_to="none", validation_steps=0,
                    lora_rank=4, lora_alpha=4.0)
    cfg.validate()
    teacher = load_teacher(shipped_teacher_path("tiny-sd"))
    data = load_emoji32()
    data.images, data.captions = data.images[:8], data.captions[:8]
    run_training(LCMMethod(cfg, teacher, LatentPromptData.from_images(teacher, data)), cfg)
    return out / "lora"


@pytest.fixture(scope="module")
def backend(student_dir, lora_dir) -> DemoBackend:
    return DemoBackend("tiny-sd", [f"pd={student_dir}", f"lcm={lora_dir}"])


@pytest.fixture(scope="module")
def served(backend):
    port = _free_port()
    app = launch(backend, port=port, block=False)
    yield app.local_url
    app.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_gives_teacher_and_student_rows_with_times_and_nfe(backend):
    shots = backend.run("hamster face", seed=3, guidance_scale=4.0, teacher_steps=10, extra_steps=3)
    student_rows = [(name, k, k) for name in ("pd", "lcm") for k in (1, 2, 3, 4, 8)]
    assert [(s.model, s.steps, s.nfe) for s in shots] == [("teacher (ddim)", 10, 20), *student_rows]
    assert type(backend.students[1].pipe.scheduler).__name__ == "LCMScheduler"  # from the LoRA's metadata
    assert all(s.milliseconds > 0 and s.image.size == (256, 256) for s in shots)
    pixels = [np.asarray(s.image, dtype=np.float32) for s in shots]
    assert np.abs(pixels[0] - pixels[1]).mean() > 1  # different samplers give different images
    again = backend.run("hamster face", seed=3, guidance_scale=4.0, teacher_steps=10, extra_steps=3)
    assert np.array_equal(pixels[0], np.asarray(again[0].image, dtype=np.float32))  # the seed fixes the noise
    unguided = backend.run("hamster face", seed=3, guidance_scale=1.0, teacher_steps=10, extra_steps=1)
    assert unguided[0].nfe == 10


@pytest.mark.parametrize("args,match", [
    (("", 0, 4.0, 50, 3), "prompt is empty"),
    (("   ", 0, 4.0, 50, 3), "prompt is empty"),
    (("x" * 301, 0, 4.0, 50, 3), "prompt has 301 characters"),
    (("sun", -1, 4.0, 50, 3), "seed=-1 is out of range"),
    (("sun", 2 ** 31, 4.0, 50, 3), "seed=2147483648 is out of range"),
    (("sun", 1.5, 4.0, 50, 3), "seed=1.5 is out of range"),
    (("sun", 0, -1.0, 50, 3), "guidance_scale=-1.0 is out of range"),
    (("sun", 0, 4.0, 0, 3), "teacher steps=0 is out of range"),
    (("sun", 0, 4.0, 101, 3), "teacher steps=101 is out of range"),
    (("sun", 0, 4.0, 50, 17), "student steps=17 is out of range"),
    (("sun", None, 4.0, 50, 3), "seed=None is out of range"),
])
def test_bad_inputs_become_one_line_messages(backend, args, match):
    with pytest.raises(DemoInputError, match=match):
        backend.run(*args)
    with pytest.raises(gr.Error, match=match):  # what the page shows instead of a stack trace
        generate(backend, *args)


def test_latest_student_is_the_newest_that_fits_the_teacher(tmp_path, student_dir):
    import os
    import time

    older = tmp_path / "a" / "pipeline"
    shutil.copytree(student_dir, older)
    newer_other_class = tmp_path / "b" / "lora"
    newer_other_class.mkdir(parents=True)
    (newer_other_class / "stepdistill_student.json").write_text(json.dumps({"teacher_class": "StableDiffusion3Pipeline"}))
    half_written = tmp_path / "c" / ".tmp-pipeline"
    shutil.copytree(student_dir, half_written)
    now = time.time()
    os.utime(older / "stepdistill_student.json", (now - 100, now - 100))
    assert find_latest_student(tmp_path, "StableDiffusionPipeline") == older
    assert find_latest_student(tmp_path, "StableDiffusion3Pipeline") == newer_other_class
    assert find_latest_student(tmp_path / "a" / "pipeline" / "unet", "StableDiffusionPipeline") is None


@pytest.fixture
def client_download_folders_removed():
    """gradio_client downloads each file through a new folder in the system's temporary directory and leaves
    it there empty (189 per test run); remove the empty ones this test added."""
    import re
    import tempfile

    temp = Path(tempfile.gettempdir())
    before = set(temp.iterdir())
    yield
    for folder in set(temp.iterdir()) - before:
        if re.fullmatch(r"[0-9a-f]{40}", folder.name) and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def test_served_app_answers_gradio_client_and_twenty_concurrent_requests(served, tmp_path, client_download_folders_removed):
    from gradio_client import Client

    client = Client(served, verbose=False, download_files=tmp_path)
    gallery, table = client.predict("red apple", 1, 4.0, 8, 2, api_name="/generate")
    assert len(gallery) == 9 and all(Path(item["image"]).is_file() for item in gallery)
    students = [[name, k, k] for name in ("pd", "lcm") for k in (1, 2, 4, 8)]
    assert [row[:3] for row in table["data"]] == [["teacher (ddim)", 8, 16], *students]
    jobs = [client.submit(f"prompt {i}", i, 2.0, 4, 2, api_name="/generate") for i in range(20)]
    results = [job.result(timeout=300) for job in jobs]
    assert len(results) == 20 and all(len(gallery) == 9 for gallery, _ in results)
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("", 1, 4.0, 8, 2, api_name="/generate")


def test_demo_listens_on_localhost_by_default(served):
    assert served.startswith("http://127.0.0.1:")
    from stepdistill.cli import build_parser

    assert build_parser().parse_args(["demo"]).host == "127.0.0.1"


def test_page_in_headless_chromium_shows_the_images(served, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from PIL import Image

    shot = tmp_path / "demo.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(served)
        # the page generates once on load: wait for the eleven gallery images (teacher + 2 students x 5)
        page.wait_for_function("[...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length >= 11",
                               timeout=120_000)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    hsv = np.asarray(Image.open(shot).convert("HSV")).astype(np.int32)
    colourful = ((hsv[..., 1] > 80) & (hsv[..., 2] > 50)).sum()
    # the bare page has ~100 saturated pixels (the button's edges); the emoji add tens of thousands
    assert colourful > 20_000, colourful


def test_cli_refuses_a_missing_teacher_with_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "stepdistill.demo", "--teacher", str(tmp_path / "nope"), "--student", "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "nope" in result.stderr and "Traceback" not in result.stderr
