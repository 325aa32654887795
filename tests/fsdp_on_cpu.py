"""Run a training script with accelerate's FSDP code path on CPU gloo processes (tests only).

accelerate chooses FSDP only on accelerator devices; with ``cpu=True`` it falls back to plain DDP
(``MULTI_CPU``) and ignores the FSDP plugin it built from the environment. PyTorch's FSDP2 itself runs on
CPU tensors and gloo, so this wrapper switches the state to FSDP after accelerate set it up, keeping that
plugin: ``prepare``, ``save_state``, ``load_state`` and ``get_state_dict`` then take accelerate's real FSDP
branches. Usage: ``torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py train_scripts/train_lcm.py ...`` with
the FSDP environment ``accelerate launch`` would set (:data:`FSDP2_ENV`)."""
from __future__ import annotations

import runpy
import sys

FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock,ResnetBlock2D",
             "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true"}


def _switch_to_fsdp() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            PartialState().distributed_type = DistributedType.FSDP  # later AcceleratorState() calls copy it back

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    _switch_to_fsdp()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
