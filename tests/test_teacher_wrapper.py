"""The teacher wrapper: conversions, batched guidance, prompt cache and sampling equal to diffusers pipelines."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from stepdistill.errors import ModelError
from stepdistill.solvers import sample_ddim, sampling_grid
from stepdistill.teacher import (PREDICTION_TYPES, Prediction, PromptEmbeds, TeacherWrapper, load_teacher,
                                 output_to_prediction, pipeline_guidance, pipeline_latents,
                                 prediction_to_output)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_conversions_match_ddpm_scheduler(prediction_type):
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type, clip_sample=False)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    t = torch.tensor([10, 700])
    acp = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = sched.add_noise(x0, eps, t)
    target = {"epsilon": eps, "sample": x0, "v_prediction": sched.get_velocity(x0, eps, t)}[prediction_type]
    pred = output_to_prediction(target, xt, acp.sqrt().flatten(), (1 - acp).sqrt().flatten(), prediction_type)
    torch.testing.assert_close(pred.x0, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(pred.eps, eps, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_output_round_trip(prediction_type):
    gen = torch.Generator().manual_seed(1)
    x, out = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    alpha = 1 - sigma if prediction_type == "flow" else (1 - sigma ** 2).sqrt()
    pred = output_to_prediction(out, x, alpha, sigma, prediction_type)
    torch.testing.assert_close(prediction_to_output(pred, alpha, sigma, prediction_type), out, atol=1e-5, rtol=1e-5)
    # x_t is recovered from the two canonical forms
    torch.testing.assert_close(alpha.view(-1, 1, 1, 1) * pred.x0 + sigma.view(-1, 1, 1, 1) * pred.eps, x, atol=1e-5, rtol=1e-5)


def test_flow_velocity_is_eps_minus_x0():
    pred = Prediction(torch.ones(1, 1), torch.full((1, 1), 3.0))
    assert pred.velocity().item() == 2.0


def test_unknown_prediction_type_is_one_line_error():
    with pytest.raises(ModelError, match="'x_prediction' is not known; allowed: epsilon, v_prediction, sample, flow"):
        output_to_prediction(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1), "x_prediction")


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_batched_guidance_equals_two_forwards(kind, request):
    pipe = request.getfixturevalue(f"{kind}_pipe")
    teacher = TeacherWrapper(pipe, max_sequence_length=8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0, 250.0]) if kind == "sd3" else torch.tensor([500, 250])
    cond = teacher.encode_prompts(["rocket", "sun"])
    w = torch.tensor([1.5, 7.0])
    with torch.no_grad():
        guided = teacher.predict(x, t, cond, guidance_scale=w)
        one_by_one = teacher.predict(x, t, cond, guidance_scale=w, batched_guidance=False)
        c, u = teacher.predict(x, t, cond), teacher.predict(x, t, teacher.empty_prompt(2))
    expected = u.eps + w.view(-1, 1, 1, 1) * (c.eps - u.eps)
    torch.testing.assert_close(guided.eps, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one_by_one.eps, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(c.eps, u.eps)  # the prompt matters


def test_prompt_cache_encodes_each_prompt_once(sd_pipe, monkeypatch):
    teacher = TeacherWrapper(sd_pipe)
    calls = []
    original = sd_pipe.encode_prompt
    monkeypatch.setattr(sd_pipe, "encode_prompt", lambda prompts, *a, **k: calls.append(list(prompts)) or original(prompts, *a, **k))
    first = teacher.encode_prompts(["rocket", "sun", "rocket"])
    second = teacher.encode_prompts(["sun", ""])
    teacher.empty_prompt(4)
    assert calls == [["rocket", "sun"], [""]]
    torch.testing.assert_close(first.hidden[1], second.hidden[0])
    torch.testing.assert_close(first.hidden[0], first.hidden[2])


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_ddim_sampling_through_wrapper_equals_sd_pipeline(sd_pipe, guidance):
    sd_pipe.scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)  # leading spacing, SD1.5 settings
    teacher = TeacherWrapper(sd_pipe)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["rocket", "banana"]
    with torch.no_grad():
        ref = sd_pipe(prompts, num_inference_steps=6, guidance_scale=guidance, latents=latents, output_type="latent").images
        embeds = teacher.encode_prompts(prompts)
        ours = sample_ddim(lambda x, t: teacher.predict(x, t, embeds, guidance), latents,
                           sampling_grid(teacher.schedule, 6, "leading", steps_offset=1), teacher.schedule)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_euler_sampling_through_wrapper_equals_sd3_pipeline(sd3_pipe):
    teacher = TeacherWrapper(sd3_pipe, max_sequence_length=8)
    assert teacher.prediction_type == "flow" and teacher.is_dit
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    prompts = ["fire", "sun"]
    with torch.no_grad():
        ref = sd3_pipe(prompts, num_inference_steps=5, guidance_scale=4.0, latents=latents, output_type="latent",
                       max_sequence_length=8).images
        embeds = teacher.encode_prompts(prompts)
        ours = sample_ddim(lambda x, t: teacher.predict(x, t, embeds, 4.0), latents,
                           sampling_grid(teacher.schedule, 5), teacher.schedule)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_ddim_sampling_through_wrapper_equals_sdxl_pipeline(sdxl_pipe, guidance):
    """SDXL's UNet also takes the second encoder's pooled embedding and the six size numbers, and its pipeline's
    unconditional input is all zeros (force_zeros_for_empty_prompt); the wrapper gives all three."""
    sdxl_pipe.scheduler = DDIMScheduler.from_config(sdxl_pipe.scheduler.config)
    teacher = TeacherWrapper(sdxl_pipe)
    assert teacher.is_sdxl and not teacher.is_dit
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["rocket", "banana"]
    with torch.no_grad():
        ref = sdxl_pipe(prompts, num_inference_steps=6, guidance_scale=guidance, latents=latents, output_type="latent").images
        embeds = teacher.encode_prompts(prompts)
        grid = sampling_grid(teacher.schedule, 6, "leading", steps_offset=1)
        ours = sample_ddim(lambda x, t: teacher.predict(x, t, embeds, guidance), latents, grid, teacher.schedule)
        unpooled = PromptEmbeds(embeds.hidden, torch.zeros_like(embeds.pooled))
        without_pooled = sample_ddim(lambda x, t: teacher.predict(x, t, unpooled, guidance), latents, grid, teacher.schedule)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (without_pooled - ref).abs().max() > 1e-2  # the pooled embedding is really used
    empty = teacher.empty_prompt(1)
    assert empty.hidden.abs().max() == 0 and empty.pooled.abs().max() == 0 and embeds.pooled.abs().max() > 0


def test_sd3_teacher_with_t5_keeps_it_and_samples_like_its_pipeline(sd3_t5_pipe, tmp_path):
    """A folder saved with SD3's T5 encoder is loaded with it (one saved without it, like the testbed DiT, is
    loaded without), and the wrapper's prompts then carry T5 tokens exactly as the pipeline's do."""
    sd3_t5_pipe.save_pretrained(tmp_path / "sd3_t5")
    with pytest.warns(UserWarning, match="max_sequence_length=6 cuts every prompt to that many T5 tokens"):
        teacher = load_teacher(tmp_path / "sd3_t5", max_sequence_length=6)
    assert type(teacher.pipe.text_encoder_3).__name__ == "T5EncoderModel"
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    prompts = ["fire", "sun"]
    with torch.no_grad():
        ref = teacher.pipe(prompts, num_inference_steps=4, guidance_scale=4.0, latents=latents, output_type="latent",
                           max_sequence_length=6).images
        embeds = teacher.encode_prompts(prompts)
        ours = sample_ddim(lambda x, t: teacher.predict(x, t, embeds, 4.0), latents, sampling_grid(teacher.schedule, 4),
                           teacher.schedule)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    t5_rows = embeds.hidden[:, -6:]  # after the CLIP tokens come the T5 tokens
    assert t5_rows.abs().amax(dim=(1, 2)).min() > 0 and not torch.allclose(t5_rows[0], t5_rows[1])


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_ddim_sampling_through_wrapper_equals_pixart_pipeline(pixart_pipe, guidance):
    """PixArt-Sigma: T5 tokens read through their attention mask, and a learned variance the pipeline drops."""
    pixart_pipe.scheduler = DDIMScheduler.from_config(pixart_pipe.scheduler.config)
    with pytest.warns(UserWarning, match="T5 tokens"):
        teacher = TeacherWrapper(pixart_pipe, max_sequence_length=8)
    assert teacher.is_pixart and teacher.is_dit and teacher.schedule.kind == "vp"
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["rocket", "sun"]
    with torch.no_grad():
        ref = pixart_pipe(prompts, num_inference_steps=6, guidance_scale=guidance, latents=latents, output_type="latent",
                          **teacher.pipeline_call_kwargs()).images
        embeds = teacher.encode_prompts(prompts)
        grid = sampling_grid(teacher.schedule, 6, "leading", steps_offset=1)
        ours = sample_ddim(lambda x, t: teacher.predict(x, t, embeds, guidance), latents, grid, teacher.schedule)
        unmasked = PromptEmbeds(embeds.hidden, None, torch.ones_like(embeds.mask))
        padding_read = sample_ddim(lambda x, t: teacher.predict(x, t, unmasked, guidance), latents, grid, teacher.schedule)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert embeds.mask.sum() < embeds.mask.numel() and (padding_read - ref).abs().max() > 1e-3  # the mask is used


def test_pipeline_classes_outside_the_supported_ones_are_refused(sdxl_pipe, tmp_path):
    """An SDXL img2img pipeline has the same UNet as the supported text-to-image one; it is refused by name in
    one line instead of failing later inside a trainer."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    img2img = StableDiffusionXLImg2ImgPipeline(**sdxl_pipe.components)
    with pytest.raises(ModelError, match="^pipeline class 'StableDiffusionXLImg2ImgPipeline' is not supported; supported: "
                                         "StableDiffusionPipeline, StableDiffusionXLPipeline"):
        TeacherWrapper(img2img)
    img2img.save_pretrained(tmp_path / "img2img")
    with pytest.raises(ModelError, match="'StableDiffusionXLImg2ImgPipeline' is not supported"):
        load_teacher(tmp_path / "img2img")


def test_with_model_shares_conversions(sd_pipe):
    import copy

    teacher = TeacherWrapper(sd_pipe)
    student_net = copy.deepcopy(sd_pipe.unet)
    student = teacher.with_model(student_net)
    assert student.model is student_net and teacher.model is sd_pipe.unet
    assert student.schedule is teacher.schedule and student.prediction_type == "epsilon"


def test_bad_teacher_inputs(tmp_path, sd_pipe):
    with pytest.raises(ModelError, match="'/no/such/teacher' is not a diffusers pipeline folder"):
        load_teacher("/no/such/teacher")
    sd_pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ModelError, match="pipeline class 'AuraFlowPipeline' is not supported"):
        load_teacher(tmp_path / "pipe", pipeline_class="AuraFlowPipeline")
    with pytest.raises(ModelError, match="prediction type 'x0' is not known"):
        load_teacher(tmp_path / "pipe", prediction_type="x0")
    loaded = load_teacher(tmp_path / "pipe")
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline" and loaded.schedule.kind == "vp"



@pytest.mark.parametrize("kind,guidance", [("flux", 1.0), ("flux", 3.5), ("flux_dev", 1.0), ("flux_dev", 3.5)])
def test_euler_sampling_through_wrapper_equals_flux_pipeline(request, kind, guidance):
    """Flux: packed 2x2 latent patches with rotary ids, CLIP's pooled embedding with T5's tokens, a shift set
    by the token count, uniform sigmas; guidance in two passes through the negative prompt (FLUX.1-schnell's
    layout) or in one through the guidance embedding (FLUX.1-dev's)."""
    pipe = request.getfixturevalue(f"{kind}_pipe")
    with pytest.warns(UserWarning, match="T5 tokens"):
        teacher = TeacherWrapper(pipe, max_sequence_length=8)
    assert teacher.is_flux and teacher.is_dit and teacher.prediction_type == "flow"
    assert teacher.embedded_guidance == (kind == "flux_dev")
    assert teacher.schedule.uniform_sigmas and teacher.schedule.shift != pipe.scheduler.config.shift
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    prompts = ["rocket", "sun"]
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=5, output_type="latent", **pipeline_latents(pipe, latents),
                   **pipeline_guidance(pipe, guidance), **teacher.pipeline_call_kwargs()).images
        embeds = teacher.encode_prompts(prompts)
        grid = sampling_grid(teacher.schedule, 5)
        ours = sample_ddim(lambda x, t: teacher.predict(x, t, embeds, guidance), latents, grid, teacher.schedule)
        unpooled = PromptEmbeds(embeds.hidden, torch.zeros_like(embeds.pooled))
        without_pooled = sample_ddim(lambda x, t: teacher.predict(x, t, unpooled, guidance), latents, grid, teacher.schedule)
        other_scale = sample_ddim(lambda x, t: teacher.predict(x, t, embeds, guidance + 2), latents, grid, teacher.schedule)
    torch.testing.assert_close(pipe._unpack_latents(ref, 8, 8, vae_scale_factor=1), ours, atol=1e-4, rtol=1e-4)
    assert (without_pooled - ours).abs().max() > 1e-3  # the pooled embedding is really used
    assert (other_scale - ours).abs().max() > 1e-3  # and so is the guidance scale, in both layouts
