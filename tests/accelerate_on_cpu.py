"""Run a training script with accelerate's FSDP or DeepSpeed code path on CPU gloo processes (tests only).

accelerate chooses FSDP and DeepSpeed only on accelerator devices; with ``cpu=True`` it falls back to plain
DDP (``MULTI_CPU``) and ignores the plugin it built from the environment. PyTorch's FSDP2 runs on CPU tensors
and gloo, and so does DeepSpeed's ZeRO through its CPU accelerator, so this wrapper switches the state to the
launched path after accelerate set it up, keeping that plugin: ``prepare``, ``save_state``, ``load_state`` and
clipping then take accelerate's real FSDP or DeepSpeed branches. Usage: ``accelerate launch --config_file
<fsdp or deepspeed config> tests/accelerate_on_cpu.py train_scripts/train_lcm.py ...``."""
from __future__ import annotations

import runpy
import sys


def _switch_to_launched_path() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU or (fsdp_plugin is None and deepspeed_plugin is None):
            return
        if fsdp_plugin is not None:
            self.fsdp_plugin, kind = fsdp_plugin, DistributedType.FSDP
        else:
            import importlib

            import deepspeed.comm

            # skip the C++ build of a shared-memory kernel only inference uses (``deepspeed.comm.torch`` is the
            # torch library there, re-exported by the package; the backend module is found by its full name)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
            deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
            self.deepspeed_plugins, kind = deepspeed_plugin, DistributedType.DEEPSPEED
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self._mixed_precision = "no"  # DeepSpeed casts the model itself, as accelerate leaves it on GPUs
        self.distributed_type = PartialState().distributed_type = kind  # later AcceleratorState() calls copy it back

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    _switch_to_launched_path()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
