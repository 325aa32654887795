"""No-grad LoRA passes with the adapter folded into the base weights give the adapter branch's numbers."""
from __future__ import annotations

import pytest
import torch

from stepdistill.methods.common import add_lora
from stepdistill.methods.lora_merge import MergedLoRA, WithTensors, adapter_network, mergeable
from stepdistill.teacher import load_teacher


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_merged_pass_equals_the_adapter_branch_and_changes_nothing(random_teachers, kind):
    teacher = load_teacher(random_teachers / kind, max_sequence_length=8)
    net = teacher.model
    add_lora(net, 4, 8.0, teacher.is_dit)  # alpha != rank: the scaling must be applied
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    assert mergeable(net)
    before = {name: p.clone() for name, p in net.named_parameters()}
    size = net.config.sample_size
    x = torch.randn(2, net.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    t, embeds = torch.tensor([999, 250]), teacher.encode_prompts(["rocket", "sun"])
    with torch.no_grad():
        branch = teacher.predict(x, t, embeds).eps
        merged = teacher.with_model(adapter_network(net)).predict(x, t, embeds).eps
        base = teacher.with_model(adapter_network(net, {n: torch.zeros_like(p) for n, p in net.named_parameters()
                                                        if "lora_B" in n})).predict(x, t, embeds).eps
        net.disable_adapters()
        teacher_only = teacher.predict(x, t, embeds).eps
        net.enable_adapters()
    assert not torch.allclose(branch, teacher_only, atol=1e-3)  # the adapter matters ...
    torch.testing.assert_close(merged, branch, atol=2e-5, rtol=1e-4)  # ... and merging keeps it
    torch.testing.assert_close(base, teacher_only, atol=2e-5, rtol=1e-4)  # overriding tensors (B = 0) is honoured
    assert all(torch.equal(p, before[name]) for name, p in net.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(teacher.predict(x, t, embeds).eps, branch)  # adapter switched back on


def test_unmergeable_networks_fall_back_to_the_adapter_branch():
    plain = torch.nn.Linear(3, 3)
    assert not mergeable(plain)
    assert adapter_network(plain) is plain
    assert isinstance(adapter_network(plain, {"weight": torch.zeros(3, 3)}), WithTensors)
    assert not isinstance(adapter_network(plain), MergedLoRA)
