"""Training Lie adapters with PyTorch's own distributed engine (DDP, FSDP2), launched by torchrun.

Only the factors are trainable, so DDP and FSDP2 synchronize only them (frozen base tensors need
no gradient buckets). Example (``torchrun --nproc_per_node=2 train.py``)::

    import torch.distributed as dist
    from liedeploy import LieConfig, apply_adapters_
    from liedeploy.distributed import wrap_for_training, save_adapter_distributed

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    model = apply_adapters_(build_model(), LieConfig(r=8, targets=["query", "value"]))
    ddp = wrap_for_training(model, "ddp")          # or "fsdp2"
    ...                                            # each rank trains on its shard of every batch
    save_adapter_distributed(model, "task.safetensors", name="task")   # call on every rank
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from liedeploy.core.adapt import adapted_names
from liedeploy.core.adapter_file import save_adapter
from liedeploy.errors import LieError

__all__ = ["wrap_for_training", "save_adapter_distributed", "fsdp2_available"]


def fsdp2_available() -> bool:
    """True when this torch has FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def wrap_for_training(model: nn.Module, strategy: str = "ddp", device: Optional[torch.device] = None) -> nn.Module:
    """Wrap an adapted model for data-parallel training; returns the module to call in the loop.

    ``"ddp"``: ``DistributedDataParallel`` over the trainable factors. ``"fsdp2"``: ``fully_shard``
    on the model (in place; returns ``model``), sharding the factors across ranks.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise LieError("wrap_for_training needs torch.distributed initialised (torchrun + init_process_group)")
    if not adapted_names(model):
        raise LieError("the model has no Lie adapters; call apply_adapters_ first")
    if device is not None:
        model.to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if strategy == "fsdp2":
        if not fsdp2_available():
            raise LieError(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not in torch {torch.__version__}")
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        return model
    raise LieError(f"strategy must be 'ddp' or 'fsdp2', got {strategy!r}")


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_adapter_distributed(model: nn.Module, path: str, name: Optional[str] = None) -> Optional[str]:
    """Save the adapter from rank 0. Call it on every rank: sharded (FSDP2) factors are gathered first.

    Returns ``path`` on rank 0, ``None`` elsewhere.
    """
    import torch.distributed as dist

    from liedeploy.core.adapt import iter_adapters

    module = model.module if hasattr(model, "module") else model
    # gather every factor (a collective for DTensors), then only rank 0 writes
    gathered = {P: (_full(lie.lie_B.data), _full(lie.lie_A.data)) for P, _, _, lie in iter_adapters(module)}
    originals = {P: _full(m.parametrizations[a].original.data) for P, m, a, _ in iter_adapters(module)}
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        save_adapter(module, path, name=name, factors=gathered, base=originals)
    if dist.is_initialized():
        dist.barrier()
    return path if rank == 0 else None
