"""Run a peft-LoRA network with each adapter folded into its base weight, for one call at a time.

Why: a LoRA layer normally runs its base layer plus a rank-r branch (two more small operators forward and
four backward). On a small network on a CPU those extra operators, not the arithmetic, are most of the
adapter's cost, so one operator per layer with ``W + scale * B @ A`` as its weight is faster: LCM-LoRA on
the testbed trained 7-9% faster with 6% less memory. On a full-size network the branch is the cheaper form
(its weight gradient is rank-sized, the folded one is the full weight's): SD1.5's UNet on a CPU took twice as
long folded. Hence an option (``--lora_forward folded``), off by default.

The folded weights are passed with ``torch.func.functional_call``: the live parameters are not touched, so
nothing drifts and gradients reach the adapter through the fold. They are passed to a *base twin*: the
network's structure without its LoRA layers, holding the very same tensors (no memory). Running peft's layer
wrappers cost about 6% of a pass in Python, and on a CPU run with a side thread that Python holds the GIL
the other thread waits for (the student's pass took 11% longer beside the peft side passes than alone, and
no longer beside plain ones). A DDP- or DeepSpeed-wrapped network is run through its wrapper instead, with its adapters
switched off for the call, so that its gradient sync stays; no other thread may run it meanwhile.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.func import functional_call

from stepdistill.errors import ConfigError

ADAPTER = "default"  # the adapter name diffusers' add_adapter gives


@dataclass
class LoraForwardOption:
    """The option the LoRA trainers share (LCM-LoRA, LADD-LoRA); their configs also have ``use_lora``,
    ``gradient_checkpointing``, ``teacher_weight_dtype`` and (from the loop) ``torch_compile``."""

    lora_forward: Literal["branched", "folded"] = "branched"  # LoRA training passes: folded runs each adapter folded into its base weight (faster on small networks on a CPU, slower on full-size ones; README); full students ignore it

    def validate_lora_forward(self) -> None:
        """Folding needs every pass to run through the folded weights, which recomputation and compiling bypass."""
        if self.lora_forward != "folded" or not self.use_lora:
            return
        clash = [name for name, on in (("gradient_checkpointing=true", self.gradient_checkpointing),
                                       ("torch_compile=true", self.torch_compile)) if on]
        if clash:
            raise ConfigError(f"lora_forward=folded cannot be combined with {clash[0]} (recomputed or compiled "
                              "passes would not see the folded weights); use lora_forward=branched")
        if self.teacher_weight_dtype != "fp32":
            raise ConfigError(f"lora_forward=folded needs teacher_weight_dtype=fp32, not {self.teacher_weight_dtype} (a "
                              "half-precision fold rounds the update away); use lora_forward=branched")


def _is_wrapper(net: torch.nn.Module) -> bool:
    """DDP or DeepSpeed's engine (checked by name: deepspeed is optional): both keep the network as ``.module``
    and must run it themselves, for their gradient reduction."""
    return isinstance(net, torch.nn.parallel.DistributedDataParallel) or type(net).__name__ == "DeepSpeedEngine"


def _inner(net: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(the network, the prefix its names carry in ``net``)."""
    return (net.module, "module.") if _is_wrapper(net) else (net, "")


def check_foldable(net: torch.nn.Module) -> list[tuple[str, Any]]:
    """The network's LoRA layers as (name, layer), or a ConfigError naming the first that cannot be folded."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, m) for name, m in _inner(net)[0].named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ConfigError("lora_forward=folded needs a LoRA network; this one has no LoRA layers")
    for name, layer in layers:
        base = layer.get_base_layer()
        problem = None
        if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)) or getattr(base, "groups", 1) != 1:
            problem = f"its base layer is a {type(base).__name__} (allowed: Linear, ungrouped Conv2d)"
        elif base.weight.dtype != torch.float32:
            problem = f"its base weight is {base.weight.dtype} (allowed: float32; a half-precision fold rounds the update away)"
        elif list(layer.lora_A) != [ADAPTER] or layer.use_dora.get(ADAPTER) or getattr(layer, "fan_in_fan_out", False):
            problem = "it is not a single plain adapter (no DoRA, no fan_in_fan_out)"
        elif not isinstance(layer.lora_dropout[ADAPTER], torch.nn.Identity):
            problem = "its adapter has dropout, which a folded weight cannot apply"
        if problem:
            raise ConfigError(f"lora_forward=folded cannot fold layer {name!r}: {problem}; use lora_forward=branched")
    return layers


class FoldedLora(torch.nn.Module):
    """``net`` as a module whose every call runs the folded weights.

    ``adapter``: the A and B tensors to fold, by the network's own parameter names (``...lora_A.default.weight``),
    e.g. an EMA of the adapter or another copy's live adapter; by default the network's own adapter (then
    gradients reach it)."""

    def __init__(self, net: torch.nn.Module, adapter: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.net, self.adapter = net, adapter
        self._layers = check_foldable(net)
        self._prefix = _inner(net)[1]
        self._adapter_params = [p for _, layer in self._layers for part in (layer.lora_A, layer.lora_B)
                                for p in part[ADAPTER].parameters()]  # looked up once, not per call
        # per layer, looked up once: the folded weight's name and the names an ``adapter`` mapping uses
        self._keys = [(f"{self._prefix}{name}.base_layer.weight", f"{name}.lora_A.{ADAPTER}.weight",
                       f"{name}.lora_B.{ADAPTER}.weight") for name, _ in self._layers]
        names = {name for name, _ in net.named_parameters()}
        missing = [key for key, _, _ in self._keys if key not in names]
        if missing:  # FSDP and DeepSpeed keep their own (flattened) parameters: nothing to swap in by name
            raise ConfigError(f"lora_forward=folded cannot run a {type(net).__name__} (no parameter {missing[0]!r}); "
                              "it runs plain, DDP and DeepSpeed (ZeRO-2) networks: use lora_forward=branched")
        # the base twin runs plain networks (built at first use, after any device move); DDP and DeepSpeed's
        # engine run as they are (a copy of the engine would copy its process groups)
        self._twin = None if self._prefix else BaseTwin(net)
        self._twin_keys = [key.replace(".base_layer.weight", ".weight") for key, _, _ in self._keys]

    def using(self, adapter: Mapping[str, torch.Tensor] | None) -> FoldedLora:
        """The same network folded with other A and B tensors (the layers are not looked up again)."""
        if self._twin is not None:
            self._twin()  # built here, so that a copy made per step shares it instead of building its own
        other = copy.copy(self)
        other.adapter = adapter
        return other

    def base_network(self) -> torch.nn.Module:
        """The network without its LoRA layers, sharing every tensor (:class:`BaseTwin`). Not for DDP-wrapped
        networks."""
        if self._twin is None:
            raise ValueError("a DDP-wrapped network has no base twin; run it through its wrapper")
        return self._twin()

    @property
    def config(self) -> Any:
        return _inner(self.net)[0].config

    def folded_weights(self) -> dict[str, torch.Tensor]:
        """``name.base_layer.weight -> W + scale * B @ A`` for every LoRA layer (a rank-r product per layer)."""
        return dict(zip((key for key, _, _ in self._keys), self._folds()))

    def _folds(self) -> Iterator[torch.Tensor]:
        source = self.adapter or {}
        for (_, a_key, b_key), (_, layer) in zip(self._keys, self._layers):
            base = layer.get_base_layer().weight
            a = source.get(a_key, layer.lora_A[ADAPTER].weight)
            b = source.get(b_key, layer.lora_B[ADAPTER].weight)
            # B is (out, r[, 1, 1]), A is (r, in[, kh, kw]): the product is the conv or linear weight's shape;
            # one fused operator (addmm) instead of a product, a scaling and a sum over the full weight
            yield torch.addmm(base.flatten(1), b.flatten(1), a.flatten(1), alpha=layer.scaling[ADAPTER]).view_as(base)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._twin is None:  # DDP / DeepSpeed: through the wrapper, so that its gradient sync stays
            weights = self.folded_weights()
            with _adapters_off(self._layers, self._adapter_params):
                return functional_call(self.net, weights, args, kwargs, strict=False, tie_weights=False)
        twin = self.base_network()
        return functional_call(twin, dict(zip(self._twin_keys, self._folds())), args, kwargs, strict=False,
                               tie_weights=False)


class BaseTwin:
    """A peft-LoRA network's base network (for a LoRA method, the teacher) as a plain module of its own,
    :func:`base_twin`, built at first use and again whenever the network holds other tensor objects than the
    twin does (``module.to`` keeps parameter objects but replaces buffers, e.g. SD3's position table). One per
    thread that runs it: a folded call swaps tensors into the twin for the call's length."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        self._twin: torch.nn.Module | None = None
        self._slots: list[tuple[dict, str, torch.Tensor]] = []  # (a module's tensor dict, name, the tensor then)

    def __call__(self) -> torch.nn.Module:
        # identity checks through dicts looked up at build time: walking the module tree per call took 1-2.5 ms
        if self._twin is None or any(slot.get(name) is not tensor for slot, name, tensor in self._slots):
            self._twin = base_twin(self.net)
            if getattr(self.net, "_compiled_call_impl", None) is not None:  # --torch_compile compiled it in place;
                self._twin.compile(dynamic=False)  # a copy drops that, so compile the twin the same way
            self._slots = [(tensors, name, tensor) for module in self.net.modules()
                           for tensors in (module._parameters, module._buffers) for name, tensor in tensors.items()]
        return self._twin


def base_twin(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of a peft-LoRA network's module structure with every LoRA layer replaced by its base layer. The
    copy holds the network's own parameter and buffer objects, so it costs no tensor memory and follows the
    network's in-place updates."""
    from peft.tuners.lora import LoraLayer

    shared = {id(t): t for t in itertools.chain(net.parameters(), net.buffers())}
    twin = copy.deepcopy(net, shared)
    for name, module in list(twin.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, module.get_base_layer())
    return twin


def folded_runner(runners: dict[int, FoldedLora], net: torch.nn.Module) -> FoldedLora:
    """``net``'s folded runner from ``runners``, built on first use. The prepared model (maybe DDP-wrapped) is
    folded as it is, so its gradient sync stays."""
    if id(net) not in runners:
        runners[id(net)] = FoldedLora(net)
    return runners[id(net)]


@contextmanager
def _adapters_off(layers: list[tuple[str, Any]], params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Switch the layers' adapters off, then back to what they were, the adapter ``params``' ``requires_grad``
    flags included (peft's switch sets them, and a frozen copy must stay frozen)."""
    wanted = [p.requires_grad for p in params]
    was_off = [layer.disable_adapters for _, layer in layers]
    for _, layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for (_, layer), off in zip(layers, was_off):
            layer.enable_adapters(not off)
        for p, flag in zip(params, wanted):
            p.requires_grad_(flag)
