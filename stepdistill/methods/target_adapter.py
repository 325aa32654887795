"""An EMA of a network's trainable tensors. LCM-LoRA's target network is one that costs the adapter's memory,
not a UNet's; LADD's ``ema_decay`` keeps one of the student (the adapter, or every weight of a full student).

The EMA copies of the trainable (LoRA) tensors are run through the student network itself with
``torch.func.functional_call``, which swaps them in for one call without touching the live parameters, so the
student's pending backward pass stays valid and nothing has to be copied back. When a run already holds a
second copy of the network (the side thread's), the EMA lives in that copy's adapter instead.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.func import functional_call

from stepdistill.training.sharding import copy_whole_into, lerp_towards


class AdapterEMA:
    """Exponential moving average of a network's trainable tensors, runnable as a network of its own."""

    def __init__(self, net: torch.nn.Module, decay: float, holder: torch.nn.Module | None = None):
        """``holder``: a frozen copy of ``net`` whose adapter tensors are the EMA (then it is the target network)."""
        self.net, self.decay, self.holder = net, decay, holder
        names = [name for name, p in net.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError("AdapterEMA needs a network with trainable (adapter) parameters")
        self._names = names
        self._bind(move_own_to=None)

    def _bind(self, move_own_to: torch.device | str | None) -> None:
        """Look the tensors up once (not per step): the live adapter, and the EMA (the holder's, or our own)."""
        live = dict(self.net.named_parameters())
        self._live = [live[name] for name in self._names]
        if self.holder is not None:
            held = dict(self.holder.named_parameters())
            self.shadow = {name: held[name] for name in self._names}
        elif move_own_to is not None:
            self.shadow = {name: t.to(move_own_to) for name, t in self.shadow.items()}
        else:
            self.shadow = {name: live[name].detach().clone() for name in self._names}

    def rebind_live(self) -> None:
        """Look the live tensors up again after ``accelerator.prepare``: FSDP2 replaces the network's
        parameters by sharded ones (DDP keeps them; then this changes nothing)."""
        live = dict(self.net.named_parameters())
        self._live = [live[name] for name in self._names]

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * live, for every adapter tensor at once (sharded live
        tensors are gathered first)."""
        lerp_towards(list(self.shadow.values()), self._live, 1 - self.decay)

    def module(self) -> torch.nn.Module:
        """The network with the EMA adapter in place of the live one (base weights shared, not copied)."""
        return self.holder if self.holder is not None else _WithTensors(self.net, self.shadow)

    @contextmanager
    def swapped_in(self, into: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
        """``net`` (or ``into``, a copy with the same parameter names, such as the whole copy of a sharded
        student) holding the EMA tensors for the duration, then its own again: a module a pipeline or an
        exporter can take as it is (validation, the final export), at the cost of one copy of the live tensors."""
        target = self.net if into is None else into
        live = self._live if into is None else [dict(into.named_parameters())[name] for name in self._names]
        saved = [t.detach().clone() for t in live]
        copy_whole_into(live, self.shadow.values())
        try:
            yield target
        finally:
            with torch.no_grad():
                for tensor, own in zip(live, saved):  # one by one: DTensors have no foreach copy
                    tensor.copy_(own)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) ^ set(state))[:3]
            raise ValueError(f"EMA adapter state does not match the network's adapter (e.g. {missing})")
        with torch.no_grad():
            for name, tensor in state.items():
                self.shadow[name].copy_(tensor)

    def to_device(self, device: torch.device | str) -> None:
        """Move the networks (a no-op if already there) and look the possibly new tensors up again."""
        self.net.to(device)
        if self.holder is not None:
            self.holder.to(device)
        self._bind(move_own_to=device)


class _WithTensors(torch.nn.Module):
    """Calls ``net`` with some of its parameters replaced for the duration of the call."""

    def __init__(self, net: torch.nn.Module, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.net, self.tensors = net, tensors

    @property
    def config(self) -> Any:
        return self.net.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.net, self.tensors, args, kwargs, strict=False, tie_weights=False)
