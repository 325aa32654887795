"""Full-model students sharded by FSDP2, run through accelerate's real FSDP code path on 2 CPU processes
(``accelerate_on_cpu.py``): the same training as one process, checkpoints that resume bitwise, and a one-line
refusal for the settings that cannot run sharded."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from stepdistill.errors import ConfigError
from stepdistill.training.sharding import check_sharding, launch_fallback_warning


def _runs(script: str, teacher_dir, tmp_path, options: list[str], port: int):
    """``script`` as 1 process x batch 4 (tmp/one) and as 2 FSDP2 processes x batch 2 (tmp/two); returns the
    single run's final loss, each FSDP process's, and the FSDP command for more runs."""
    from method_runs import fsdp_launch, one_and_launched_runs

    return one_and_launched_runs(script, teacher_dir, options, tmp_path, fsdp_launch(port, tmp_path))


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_full_lcm_sharded_by_fsdp2_trains_as_one_process(random_teachers, tmp_path):
    """Full LCM (EMA target network, validation) as 2 FSDP2 processes equals the 1-process run, and its
    checkpoint is accelerate's FSDP one. Before the sharding support the EMA update mixed sharded and whole
    tensors and the run failed at its first step."""
    from method_runs import apart_over_moved

    options = ["--use_lora", "false", "--max_train_steps", "3", "--validation_steps", "3"]
    loss_one, losses_two, _ = _runs("train_lcm.py", random_teachers / "sd", tmp_path, options, port=29561)
    assert len(losses_two) == 2 and all(abs(x - loss_one) < 1e-4 * abs(loss_one) for x in losses_two)
    assert (tmp_path / "two" / "checkpoint-3" / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP save ran
    assert len(list((tmp_path / "two" / "validation").glob("*.png"))) == 1  # every process sampled, one wrote
    start = _weights(random_teachers / "sd")
    one, two = _weights(tmp_path / "one" / "pipeline"), _weights(tmp_path / "two" / "pipeline")
    assert apart_over_moved(one, two, start) < 1e-3


def test_full_ladd_sharded_by_fsdp2_trains_as_one_process_and_resumes_bitwise(random_teachers, tmp_path):
    """LADD with a full student, its EMA and the discriminator heads (plain DDP under FSDP, checkpointed by the
    trainer): 2 FSDP2 processes give the 1-process result, the export is the EMA gathered whole, and the
    step-2 checkpoint resumes under FSDP to the same weights bitwise (heads and their optimizer included)."""
    import shutil

    from method_runs import apart_over_moved, run_ok

    options = ["--use_lora", "false", "--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit",
               "3", "--student_steps", "2", "--student_sampler", "deterministic", "--ema_decay", "0.5", "--disc_hidden", "8",
               "--synthetic_steps", "2",
               "--validation_steps", "4"]
    loss_one, losses_two, command = _runs("train_ladd.py", random_teachers / "sd", tmp_path, options, port=29567)
    assert len(losses_two) == 2 and all(abs(x - loss_one) < 1e-4 * max(1.0, abs(loss_one)) for x in losses_two)
    start = _weights(random_teachers / "sd")
    two = _weights(tmp_path / "two" / "pipeline")
    assert apart_over_moved(_weights(tmp_path / "one" / "pipeline"), two, start) < 1e-3
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run_ok([*command, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    resumed = _weights(tmp_path / "resumed" / "pipeline")
    assert all((resumed[k] == two[k]).all() for k in two)


def test_progressive_sharded_by_fsdp2_hands_rounds_over_as_one_process(random_teachers, tmp_path):
    """Across a round boundary the EMA becomes the next teacher and the sharded student restarts from it on
    every process (a whole state cut into each process's slices): both rounds equal the 1-process run."""
    from method_runs import apart_over_moved

    options = ["--start_steps", "4", "--end_steps", "1", "--iterations_per_round", "2", "--ema_decay", "0.5",
               "--w_min", "2", "--w_max", "2"]
    loss_one, losses_two, _ = _runs("train_progressive.py", random_teachers / "sd", tmp_path, options, port=29563)
    assert len(losses_two) == 2 and all(abs(x - loss_one) < 1e-4 * max(1.0, abs(loss_one)) for x in losses_two)
    start = _weights(random_teachers / "sd")
    for folder in ("rounds/round-0-2steps", "pipeline"):
        share = apart_over_moved(_weights(tmp_path / "one" / folder), _weights(tmp_path / "two" / folder), start)
        assert share < 1e-3, (folder, share)


def test_a_lora_student_under_fsdp_is_refused_in_one_line_before_training(random_teachers, tmp_path):
    from method_runs import fsdp_launch, script_command

    path, common = script_command("train_lcm.py", random_teachers / "sd", tmp_path, ["--max_train_steps", "2"])
    done = subprocess.run([*fsdp_launch(29565, tmp_path), path, *common, "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = {line for line in done.stderr.splitlines() if line.startswith("error: ")}
    assert len(errors) == 1 and "use_lora=true" in errors.pop()
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def _accelerator(kind: DistributedType, version: int = 2):
    return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))


@pytest.mark.parametrize("accelerator, refusal, match", [
    (_accelerator(DistributedType.FSDP, version=1), None, "fsdp_version=1 is not supported"),
    (_accelerator(DistributedType.FSDP), "use_lora=true (why)", "lcm cannot run sharded by FSDP with use_lora=true"),
], ids=["fsdp1", "refused-setting"])
def test_check_sharding_refuses(accelerator, refusal, match):
    with pytest.raises(ConfigError, match=match):
        check_sharding(accelerator, "lcm", refusal)


@pytest.mark.parametrize("kind, refusal", [(DistributedType.FSDP, None), (DistributedType.MULTI_CPU, "use_lora=true"),
                                           (DistributedType.NO, "anything")])
def test_check_sharding_lets_supported_runs_through(kind, refusal):
    check_sharding(_accelerator(kind), "lcm", refusal)  # raises nothing


def test_each_trainer_says_which_settings_fsdp_cannot_run(random_teachers, tmp_path):
    """Full students run sharded, with or without discriminator heads; LoRA students are refused."""
    from method_runs import build_method

    from stepdistill.methods.ladd import LADDConfig, LADDMethod
    from stepdistill.methods.lcm import LCMConfig, LCMMethod
    from stepdistill.methods.progressive import ProgressiveConfig, ProgressiveMethod

    teacher = random_teachers / "sd"
    adversarial = dict(adversarial_weight=0.5, disc_hidden=8)
    assert build_method(LCMConfig, LCMMethod, teacher, tmp_path / "a", use_lora=False, **adversarial).sharding_refusal() is None
    assert "use_lora=true" in build_method(LCMConfig, LCMMethod, teacher, tmp_path / "b").sharding_refusal()
    assert build_method(LADDConfig, LADDMethod, teacher, tmp_path / "c", use_lora=False, disc_hidden=8).sharding_refusal() is None
    assert "use_lora=true" in build_method(LADDConfig, LADDMethod, teacher, tmp_path / "d", disc_hidden=8).sharding_refusal()
    progressive = build_method(ProgressiveConfig, ProgressiveMethod, teacher, tmp_path / "e", start_steps=4, end_steps=2,
                               max_train_steps=0, iterations_per_round=2, **adversarial)
    assert not hasattr(progressive, "sharding_refusal")  # nothing to refuse: the loop's default


def test_fp16_discriminator_heads_under_fsdp_are_refused_in_one_line(random_teachers, tmp_path):
    """Under FSDP the heads' optimizer is outside accelerate's gradient scaler, so fp16 would step on scaled
    gradients: refused before training."""
    from method_runs import build_method

    from stepdistill.methods.lcm import LCMConfig, LCMMethod

    method = build_method(LCMConfig, LCMMethod, random_teachers / "sd", tmp_path / "a", use_lora=False,
                          adversarial_weight=0.5, disc_hidden=8)
    fp16_fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, scaler=object())
    with pytest.raises(ConfigError, match="mixed_precision=fp16 cannot train discriminator heads under FSDP"):
        method.adversarial.prepare(fp16_fsdp)


@pytest.mark.parametrize("flag, name, kind", [("ACCELERATE_USE_FSDP", "FSDP", DistributedType.FSDP),
                                              ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", DistributedType.DEEPSPEED)])
def test_an_fsdp_or_deepspeed_launch_that_accelerate_runs_as_ddp_is_reported(flag, name, kind):
    """On CPU processes accelerate turns FSDP and DeepSpeed launches into DDP silently; the loop warns in one line."""
    asked = {flag: "true"}
    message = launch_fallback_warning(asked, _accelerator(DistributedType.MULTI_CPU))
    assert message is not None and f"asked for {name} but" in message and "runs this process as MULTI_CPU" in message
    assert launch_fallback_warning(asked, _accelerator(kind)) is None
    assert launch_fallback_warning({}, _accelerator(DistributedType.MULTI_CPU)) is None
