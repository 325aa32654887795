"""``lora_forward=folded``: a LoRA network run with each adapter folded into its base weight gives the branched
network's outputs and gradients, leaves the network as it found it, and refuses what it cannot fold."""
from __future__ import annotations

import copy

import pytest
import torch

from stepdistill.errors import ConfigError
from stepdistill.methods.common import add_lora
from stepdistill.methods.folded_lora import FoldedLora
from stepdistill.methods.lcm import LCMConfig


@pytest.fixture
def lora_unet(sd_pipe):
    """The random SD teacher's UNet with a rank-4 adapter whose B is not zero (so folding changes the weights)."""
    net = copy.deepcopy(sd_pipe.unet).float()
    add_lora(net, 4, 8.0, is_dit=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return net


def unet_inputs(net: torch.nn.Module, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size, width = net.config.sample_size, net.config.cross_attention_dim
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, net.config.in_channels, size, size, generator=g), torch.tensor([500, 20]),
            torch.randn(batch, 5, width, generator=g))


def adapter_grads(net: torch.nn.Module, run: torch.nn.Module, inputs: tuple) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, t, text = inputs
    out = run(x, t, encoder_hidden_states=text).sample
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.requires_grad}
    net.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_folded_pass_gives_the_branched_outputs_and_adapter_gradients(lora_unet):
    inputs = unet_inputs(lora_unet)
    branched, branched_grads = adapter_grads(lora_unet, lora_unet, inputs)
    folded, folded_grads = adapter_grads(lora_unet, FoldedLora(lora_unet), inputs)
    assert (branched - folded).abs().max() < 1e-4 * branched.abs().max()
    assert branched_grads.keys() == folded_grads.keys() and len(branched_grads) > 0
    for name, g in branched_grads.items():
        assert (g - folded_grads[name]).norm() <= 1e-4 * g.norm() + 1e-8, name
    # the fold really changed the weights the pass used: without the adapter the output differs
    lora_unet.disable_adapters()
    with torch.no_grad():
        plain = lora_unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    lora_unet.enable_adapters()
    assert (plain - folded).abs().max() > 100 * (branched - folded).abs().max()


def test_a_frozen_copy_folded_with_live_tensors_runs_the_live_adapter_and_stays_frozen(lora_unet):
    """LCM's side thread runs its target pass on a frozen copy folded with the student's live adapter."""
    side = copy.deepcopy(lora_unet).requires_grad_(False)
    with torch.no_grad():
        for name, p in lora_unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)  # the live adapter moved on; the copy still holds the old one
    live = {name: p.detach() for name, p in lora_unet.named_parameters() if p.requires_grad}
    x, t, text = unet_inputs(lora_unet)
    with torch.no_grad():
        expected = lora_unet(x, t, encoder_hidden_states=text).sample
        stale = side(x, t, encoder_hidden_states=text).sample
        got = FoldedLora(side).using(live)(x, t, encoder_hidden_states=text).sample
    assert (expected - got).abs().max() < 1e-4 * expected.abs().max() < (expected - stale).abs().max()
    assert not any(p.requires_grad for p in side.parameters())  # peft's adapter switch would have unfrozen it
    assert all(p.requires_grad for name, p in lora_unet.named_parameters() if "lora_" in name)
    # a network whose adapters were switched off stays switched off after a folded call
    side.disable_adapters()
    with torch.no_grad():
        FoldedLora(side)(x, t, encoder_hidden_states=text)
        again = side(x, t, encoder_hidden_states=text).sample
    side.enable_adapters()
    side.requires_grad_(False)
    lora_unet.disable_adapters()
    with torch.no_grad():
        base = lora_unet(x, t, encoder_hidden_states=text).sample
    lora_unet.enable_adapters()
    assert torch.equal(again, base)


def test_layers_that_cannot_be_folded_are_refused_in_one_line(lora_unet, sd_pipe):
    half = copy.deepcopy(lora_unet).half()
    with pytest.raises(ConfigError, match=r"cannot fold layer .*float16.*use lora_forward=branched"):
        FoldedLora(half)
    with pytest.raises(ConfigError, match="has no LoRA layers"):
        FoldedLora(copy.deepcopy(sd_pipe.unet))


@pytest.mark.parametrize("overrides,match", [
    (dict(gradient_checkpointing=True), "with gradient_checkpointing=true"),
    (dict(torch_compile=True), "with torch_compile=true"),
])
def test_folded_lcm_options_that_clash_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=f"lora_forward=folded cannot be combined {match}"):
        LCMConfig(lora_forward="folded", **overrides).validate()
    LCMConfig(lora_forward="folded", use_lora=False, **overrides).validate()  # a full student has nothing to fold


def test_a_network_whose_weights_are_not_its_parameters_is_refused(lora_unet):
    """FSDP and DeepSpeed keep flattened parameters and leave the layers plain tensor views: folding by name
    would swap in nothing, so it is refused."""
    from peft.tuners.lora import LoraLayer

    base = next(m for m in lora_unet.modules() if isinstance(m, LoraLayer)).get_base_layer()
    view = base.weight.detach()
    del base.weight
    base.weight = view
    with pytest.raises(ConfigError, match=r"cannot run a UNet2DConditionModel \(no parameter .*base_layer.weight.*use lora_forward=branched"):
        FoldedLora(lora_unet)


def test_the_base_twin_shares_the_networks_tensors_and_runs_its_base(lora_unet):
    """Plain networks run folded through a twin without LoRA layers: it must cost no tensor memory, follow the
    network's updates and compute exactly what the network computes with its adapters off."""
    from peft.tuners.lora import LoraLayer

    twin = FoldedLora(lora_unet).base_network()
    assert not any(isinstance(m, LoraLayer) for m in twin.modules())
    own = {id(p) for p in lora_unet.parameters()}
    assert all(id(p) in own for p in twin.parameters())
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for name, p in lora_unet.named_parameters()
                                                            if "lora_" not in name)
    x, t, text = unet_inputs(lora_unet)
    with torch.no_grad():
        lora_unet.disable_adapters()
        base = lora_unet(x, t, encoder_hidden_states=text).sample
        lora_unet.enable_adapters()
        assert torch.equal(twin(x, t, encoder_hidden_states=text).sample, base)
        lora_unet.conv_out.weight.mul_(2.0)  # an in-place change of the network reaches the twin
        assert not torch.equal(twin(x, t, encoder_hidden_states=text).sample, base)


def test_a_folded_call_of_a_plain_network_never_switches_its_adapters(lora_unet, monkeypatch):
    """LCM's side thread runs the student's network while the main thread's folded pass runs: the pass must not
    switch the shared network's adapters (peft's switch is what a DDP-wrapped network still needs)."""
    from peft.tuners.lora import LoraLayer

    switches = []
    monkeypatch.setattr(LoraLayer, "enable_adapters", lambda self, on: switches.append(on))
    x, t, text = unet_inputs(lora_unet)
    out = FoldedLora(lora_unet)(x, t, encoder_hidden_states=text).sample
    out.sum().backward()
    assert switches == []
    assert all(p.grad is not None for name, p in lora_unet.named_parameters() if "lora_" in name)


def test_the_base_twin_is_rebuilt_when_a_device_move_replaces_buffers(sd3_pipe):
    """``module.to(device)`` keeps parameter objects but replaces buffers (SD3's position table): a twin built
    before the move would run the old buffers."""
    net = copy.deepcopy(sd3_pipe.transformer).float()
    add_lora(net, 4, 8.0, is_dit=True)
    folded = FoldedLora(net)
    before = folded.base_network()
    net._apply(lambda tensor: tensor.clone())  # what a move does to the tensors, on a CPU-only machine
    after = folded.base_network()
    assert after is not before
    assert after.pos_embed.pos_embed is net.pos_embed.pos_embed is not before.pos_embed.pos_embed
    assert folded.base_network() is after  # not rebuilt per call
    net.norm_out.linear.bias = torch.nn.Parameter(net.norm_out.linear.bias.detach().clone())  # a parameter replaced
    again = folded.base_network()
    assert again is not after and again.norm_out.linear.bias is net.norm_out.linear.bias


def test_the_base_twin_of_a_compiled_network_is_compiled_too(lora_unet):
    """--torch_compile compiles the networks in place; a deep copy drops that, and the teacher passes would run
    eager. (Compiling happens at the first call, so nothing is compiled here.)"""
    from stepdistill.methods.folded_lora import BaseTwin

    assert BaseTwin(lora_unet)()._compiled_call_impl is None
    lora_unet.compile(dynamic=False)
    assert BaseTwin(lora_unet)()._compiled_call_impl is not None
