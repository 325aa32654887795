"""The Gradio page: one prompt, the teacher beside its few-step students, each with its time and NFE.

Binds 127.0.0.1 unless told otherwise, sends no analytics, needs no internet (system fonts only), and
serves requests through a bounded queue one at a time, so many users cannot exhaust memory.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr  # noqa: E402

from stepdistill.demo.backend import (MAX_GUIDANCE, MAX_SEED, MAX_STUDENT_STEPS, MAX_TEACHER_STEPS, DemoBackend,  # noqa: E402
                                      DemoInputError)

TABLE_HEADERS = ["model", "steps", "NFE", "ms"]


def generate(backend: DemoBackend, prompt: str, seed: float, guidance_scale: float, teacher_steps: float, extra_steps: float):
    """Gallery items and a timing table; bad input becomes a visible message, never a stack trace."""
    try:
        shots = backend.run(prompt, seed, guidance_scale, teacher_steps, extra_steps)
    except DemoInputError as error:
        raise gr.Error(str(error)) from None
    gallery = [(shot.image, shot.caption) for shot in shots]
    table = [[shot.model, shot.steps, shot.nfe, round(shot.milliseconds, 1)] for shot in shots]
    return gallery, table


def build_app(backend: DemoBackend, max_queue: int = 64) -> gr.Blocks:
    """The page; generation also runs once on page load so the first view already shows images."""
    names = ", ".join(s.name for s in backend.students) or "none (pass --student)"
    with gr.Blocks(title="stepdistill: steps vs quality", analytics_enabled=False) as app:
        decoder = f" · all decode with `{backend.decoder}`" if backend.decoder else ""
        gr.Markdown(f"## stepdistill · teacher `{backend.teacher_path.name}` vs students: {names}{decoder}")
        with gr.Row():
            prompt = gr.Textbox(value="hamster face", label="prompt", max_lines=1)
            seed = gr.Number(value=0, precision=0, label=f"seed (0 to {MAX_SEED})")
            guidance = gr.Slider(0, MAX_GUIDANCE, value=4.0, step=0.5, label="teacher guidance scale")
        with gr.Row():
            teacher_steps = gr.Slider(1, MAX_TEACHER_STEPS, value=50, step=1, label="teacher steps")
            extra_steps = gr.Slider(1, MAX_STUDENT_STEPS, value=3, step=1, label="extra student step count (besides 1, 2, 4, 8)")
        button = gr.Button("Generate", variant="primary")
        gallery = gr.Gallery(label="same prompt, same noise", columns=6, object_fit="contain", height="auto", elem_id="results")
        table = gr.Dataframe(headers=TABLE_HEADERS, label="wall-clock time per image (text encoding and VAE decode included)",
                             elem_id="timings")
        inputs = [prompt, seed, guidance, teacher_steps, extra_steps]
        run = lambda *values: generate(backend, *values)  # noqa: E731
        button.click(run, inputs, [gallery, table], api_name="generate")
        prompt.submit(run, inputs, [gallery, table], api_name=False)
        app.load(run, inputs, [gallery, table], api_name=False)
    app.queue(default_concurrency_limit=1, max_size=max_queue)
    return app


def launch(backend: DemoBackend, host: str = "127.0.0.1", port: int | None = None, max_queue: int = 64,
           block: bool = True) -> gr.Blocks:
    """Serve the app on ``host:port`` (localhost by default); ``block=False`` returns at once (tests)."""
    app = build_app(backend, max_queue)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
               show_error=True, theme=theme)
    return app
