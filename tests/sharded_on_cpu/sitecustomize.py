"""Test shim: lets accelerate run FSDP2 and DeepSpeed ZeRO-3 on CPU (gloo), in the test's ranks only.

accelerate 1.15 picks its distributed type from the device: without CUDA (or another accelerator)
a rank is MULTI_CPU, and it then ignores an FSDP or DeepSpeed config (selftrain refuses that with
one line, see `selftrain.stages.train.check_strategy`). tests/test_train_sharded.py puts this folder on
PYTHONPATH and sets SELFTRAIN_TEST_SHARDED_ON_CPU=1; Python imports `sitecustomize` at start-up,
and in each rank (LOCAL_RANK is set) this patches only that device check: the rank reports
MULTI_GPU with the gloo backend on device cpu, so accelerate turns on the configured FSDP or
DeepSpeed exactly as on GPUs. Sharding, training, the gather and the save are the real ones.
DeepSpeed also needs its CPU accelerator (DS_ACCELERATOR=cpu; gloo without oneCCL) and `cpu=False`,
which selftrain sets to True when no GPU is visible (TrainingArguments.use_cpu).
"""
import os

if os.environ.get("SELFTRAIN_TEST_SHARDED_ON_CPU") == "1" and "LOCAL_RANK" in os.environ:
    import torch.distributed as dist
    from accelerate import state
    from accelerate.utils import DistributedType

    _deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if not _deepspeed and not dist.is_initialized():  # DeepSpeed starts its own process group
            dist.init_process_group("gloo")
        return "gloo", DistributedType.MULTI_GPU

    state.PartialState._prepare_backend = _prepare_backend
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    if _deepspeed:
        os.environ["DS_ACCELERATOR"] = "cpu"
        _partial_init, _accel_init = state.PartialState.__init__, state.AcceleratorState.__init__

        def _partial(self, cpu=False, **kw):
            _partial_init(self, cpu=False, **kw)

        def _accel(self, *a, cpu=False, **kw):
            _accel_init(self, *a, cpu=False, **kw)

        state.PartialState.__init__, state.AcceleratorState.__init__ = _partial, _accel
