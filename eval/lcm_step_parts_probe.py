"""Time the parts of one LCM-LoRA step in this process: the whole step, the student's forward and backward,
the teacher's guided solver step and the target pass, each LoRA pass run both ways (``--lora_forward``):
through peft's adapter branches and with each adapter folded into its base weight.

    python eval/lcm_step_parts_probe.py --threads 1 --batch 16    # one process of a 2-process CPU run
    python eval/lcm_step_parts_probe.py --threads 2 --batch 32
    python eval/lcm_step_parts_probe.py --threads 1 --batch 32 --beside   # also beside a busy second thread

Why: the speed comparison with diffusers' reference script is decided by these passes, and whether folding
pays depends on the network's size and the thread count; this shows it on your machine.
Nothing is written; medians of ``--repeats`` timed calls are printed in milliseconds. ``--beside`` times the
student's folded pass again while a second thread (one torch thread) loops what LCM's side thread runs, the
teacher's guided step and the target pass, and then a plain matrix product: a pass that slows beside the
first but not beside the second is waiting for the GIL, not for the hardware.
"""
from __future__ import annotations

import argparse
import threading
import time

import torch

from stepdistill.config import parse_cli
from stepdistill.evaluation.sampling_parts import median_ms
from stepdistill.methods.common import load_teacher_and_data
from stepdistill.methods.folded_lora import FoldedLora
from stepdistill.methods.lcm import LCMConfig, LCMMethod
from stepdistill.training.step_random import StepRandom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="tiny-sd")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--beside", action="store_true", help="also time the folded student pass beside a busy thread")
    args = parser.parse_args()
    if args.threads < 1 or args.batch < 1 or args.repeats < 1:
        raise SystemExit(f"error: --threads {args.threads}, --batch {args.batch} and --repeats {args.repeats} "
                         "must all be positive")
    torch.set_num_threads(args.threads)
    cfg = parse_cli(LCMConfig, ["--config", "configs/lcm_lora_tiny_sd.yaml", "--pretrained_teacher_model", args.teacher,
                                "--train_batch_size", str(args.batch), "--use_target_network", "false",
                                "--overlap_teacher", "false", "--lora_forward", "branched", "--output_dir", "unused"])
    teacher, data = load_teacher_and_data(cfg)
    method = LCMMethod(cfg, teacher, data)
    model = method.student_net
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    cpu = torch.device("cpu")
    batch = method.make_batch(list(range(args.batch)), cpu)
    x0, embeds = batch["latents"], batch["embeds"]
    t, noise, w = method._draws(x0, StepRandom(cfg.seed, 0, 0, 1, args.batch, cpu))
    _, _, x_t, t_prev = method._noised(x0, t, noise)

    def whole_step() -> None:
        loss, _ = method.compute_loss(model, batch, StepRandom(cfg.seed, 1, 0, 1, args.batch, cpu))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(10):  # move the adapter away from its zero initialisation, so folding changes the weights
        whole_step()
    folded = FoldedLora(model)

    def student_forward_backward(net: torch.nn.Module) -> None:
        consistency = method.teacher.with_model(net).predict(x_t, t, embeds).x0
        consistency.float().pow(2).mean().backward()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def teacher_step() -> None:
        method._teacher_solver_step(x_t, t, t_prev, embeds, w)

    @torch.no_grad()
    def target(net: torch.nn.Module) -> torch.Tensor:
        return teacher.with_model(net).predict(x_t, t_prev, embeds).x0

    gap = (target(model) - target(folded)).abs().max().item()
    print(f"{args.threads} thread(s), batch {args.batch}; folded vs branched target max |diff| {gap:.2e}")
    for name, fn in [("whole step (branched)", whole_step),
                     ("student forward + backward, branched", lambda: student_forward_backward(model)),
                     ("student forward + backward, folded", lambda: student_forward_backward(folded)),
                     (f"teacher guided step (batch {2 * args.batch})", teacher_step),
                     ("target pass, branched", lambda: target(model)),
                     ("target pass, folded", lambda: target(folded))]:
        print(f"{name:36s} {median_ms(fn, args.repeats):8.1f} ms", flush=True)
    if args.beside:
        side_folded = FoldedLora(model)  # a runner (and twin) of the second thread's own, as in training
        side_work = {"the side thread's passes": lambda: (teacher_step(), target(side_folded)),
                     "a matrix product": lambda: torch.randn(1024, 1024) @ torch.randn(1024, 1024)}
        for name, work in side_work.items():
            print(f"student folded, beside {name:22s} {beside(work, lambda: student_forward_backward(folded), args.repeats):8.1f} ms",
                  flush=True)


def beside(work, fn, repeats: int) -> float:
    """Median ms of ``fn`` while another thread runs ``work`` in a loop on one torch thread."""
    stop = threading.Event()

    def loop() -> None:
        torch.set_num_threads(1)
        with torch.no_grad():
            while not stop.is_set():
                work()

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.5)  # let the loop get going
    try:
        return median_ms(fn, repeats)
    finally:
        stop.set()
        thread.join()


if __name__ == "__main__":
    main()
