"""Students trained under DeepSpeed ZeRO-2, run through accelerate's real DeepSpeed code path on 2 CPU
processes (``accelerate_on_cpu.py``): the same training as one process, checkpoints that resume bitwise
through the weights-only unpickler, and one-line refusals for what cannot run."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from stepdistill.errors import ConfigError
from stepdistill.training.deepspeed_setup import configure_deepspeed

pytest.importorskip("deepspeed")


def _runs(script: str, teacher_dir, tmp_path, options: list[str], port: int):
    """``script`` as 1 process x batch 4 (tmp/one) and as 2 ZeRO-2 processes x batch 2 (tmp/two); returns the
    single run's final loss, each DeepSpeed process's, and the DeepSpeed command for more runs."""
    from method_runs import deepspeed_launch, one_and_launched_runs

    return one_and_launched_runs(script, teacher_dir, options, tmp_path, deepspeed_launch(port, tmp_path))


def _resumed_from_step_2(command, tmp_path):
    from method_runs import run_ok

    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run_ok([*command, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    return tmp_path / "resumed"


def _same_loss(loss_one: float, losses_two: list[float]) -> bool:
    return len(losses_two) == 2 and all(abs(x - loss_one) < 1e-4 * max(1.0, abs(loss_one)) for x in losses_two)


def test_lcm_lora_under_zero2_trains_as_one_process_and_resumes_bitwise(random_teachers, tmp_path):
    """Before the DeepSpeed support ``prepare`` failed (accelerate found no micro-batch size in the trainers'
    batches). The engine's checkpoint leaves the frozen base out, and a resume reads it weights-only. The
    student runs folded, as the shipped LCM-LoRA config asks: it used to deep-copy the engine (and its process
    groups) for a base twin; the engine must run its network itself."""
    from method_runs import apart_over_moved
    from safetensors.torch import load_file

    options = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--lora_forward", "folded"]
    loss_one, losses_two, command = _runs("train_lcm.py", random_teachers / "sd", tmp_path, options, port=29571)
    assert _same_loss(loss_one, losses_two)
    weights = "lora/pytorch_lora_weights.safetensors"
    one, two = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    lora_b_start = {k: torch.zeros_like(v) for k, v in one.items() if ".lora_B." in k}  # B starts at zero
    assert apart_over_moved(one, two, lora_b_start) < 1e-3
    engine_file = tmp_path / "two" / "checkpoint-4" / "pytorch_model" / "mp_rank_00_model_states.pt"
    module = torch.load(engine_file, weights_only=True)["module"]
    assert module and all("lora_" in key for key in module)  # DeepSpeed's own save ran, without the frozen base
    resumed = load_file(_resumed_from_step_2(command, tmp_path) / weights)
    assert all(torch.equal(resumed[k], two[k]) for k in two)


def test_full_ladd_under_zero2_with_ema_and_heads_trains_as_one_process_and_resumes_bitwise(random_teachers, tmp_path):
    """A full student with its EMA and the discriminator heads (plain DDP beside the engine, checkpointed by
    the trainer): the 1-process result, and the step-2 checkpoint resumes to the same weights bitwise."""
    from method_runs import apart_over_moved
    from safetensors.torch import load_file

    options = ["--use_lora", "false", "--max_train_steps", "4", "--checkpointing_steps", "2", "--student_steps", "2",
               "--student_sampler", "deterministic", "--ema_decay", "0.5", "--disc_hidden", "8", "--synthetic_steps", "2"]
    loss_one, losses_two, command = _runs("train_ladd.py", random_teachers / "sd", tmp_path, options, port=29573)
    assert _same_loss(loss_one, losses_two)
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"
    start = load_file(random_teachers / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    two = load_file(tmp_path / "two" / weights)
    assert apart_over_moved(load_file(tmp_path / "one" / weights), two, start) < 1e-3
    resumed = load_file(_resumed_from_step_2(command, tmp_path) / weights)
    assert all(torch.equal(resumed[k], two[k]) for k in two)


def test_progressive_under_zero2_hands_rounds_over_as_one_process(random_teachers, tmp_path):
    """At a round boundary the student restarts from the EMA: DeepSpeed's own fp32 copy of the weights must
    restart with it, or the next step would bring the old student back."""
    from method_runs import apart_over_moved
    from safetensors.torch import load_file

    options = ["--start_steps", "4", "--end_steps", "1", "--iterations_per_round", "2", "--ema_decay", "0.5",
               "--w_min", "2", "--w_max", "2"]
    loss_one, losses_two, _ = _runs("train_progressive.py", random_teachers / "sd", tmp_path, options, port=29575)
    assert _same_loss(loss_one, losses_two)
    start = load_file(random_teachers / "sd" / "unet" / "diffusion_pytorch_model.safetensors")
    for folder in ("rounds/round-0-2steps", "pipeline"):
        weights = f"{folder}/unet/diffusion_pytorch_model.safetensors"
        share = apart_over_moved(load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights), start)
        assert share < 1e-3, (folder, share)


def _deepspeed_accelerator(config: dict, processes: int = 2):
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


def test_configure_fills_the_batch_and_clipping_the_loop_owns():
    config = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    configure_deepspeed(_deepspeed_accelerator(config, processes=3), train_batch_size=4, max_grad_norm=0.5)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 12
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 0.5
    kept = {"zero_optimization": {"stage": 1}, "gradient_clipping": 2.0}
    configure_deepspeed(_deepspeed_accelerator(kept), train_batch_size=4, max_grad_norm=0.5)
    assert kept["gradient_clipping"] == 2.0  # a value the DeepSpeed config sets stays


@pytest.mark.parametrize("config, match", [
    ({"zero_optimization": {"stage": 3}}, "zero_stage=3 is not supported"),
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 is not supported"),
], ids=["zero3", "accumulation"])
def test_configure_refuses_in_one_line(config, match):
    with pytest.raises(ConfigError, match=match):
        configure_deepspeed(_deepspeed_accelerator(config), train_batch_size=4, max_grad_norm=1.0)


def test_a_resume_through_another_checkpoint_engine_is_refused():
    """Only DeepSpeed's default engine is made to read weights-only; another engine would unpickle freely."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from stepdistill.training.deepspeed_setup import weights_only_engine_loads

    class OtherEngine:
        pass

    accelerator = _deepspeed_accelerator({})
    with pytest.raises(ConfigError, match="resuming through DeepSpeed's OtherEngine is not supported"):
        with weights_only_engine_loads(accelerator, SimpleNamespace(checkpoint_engine=OtherEngine())):
            pass
    default = TorchCheckpointEngine.__new__(TorchCheckpointEngine)
    original = TorchCheckpointEngine.load
    with weights_only_engine_loads(accelerator, SimpleNamespace(checkpoint_engine=default)):
        assert TorchCheckpointEngine.load is not original  # patched while the resume loads
    assert TorchCheckpointEngine.load is original
