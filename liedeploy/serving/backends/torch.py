"""The torch serving backend: :class:`liedeploy.AdapterBank` behind the serving protocol (CPU or CUDA)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from liedeploy.serving.backend import discover_task_files, run_mixed_by_task
from liedeploy.core.fused import fold_path
from liedeploy.core.outputs import flatten_named
from liedeploy.serving.specs import TensorSpec

__all__ = ["TorchBackend"]


class TorchBackend:
    """:class:`Backend` over :class:`liedeploy.AdapterBank` (CPU or CUDA).

    Args:
        model: the base architecture with its base weights loaded.
        input_specs: the model's inputs; one spec: called positionally, several: as keyword
            arguments by name (``input_ids``, ``attention_mask``).
        cache_bytes: the bank's byte budget for folded tasks.
        cache_policy: which folded tasks the bank keeps (``"frequency"`` or ``"lru"``).
        device: ``"cpu"`` or ``"cuda"``.
        max_batch: the most samples per batch; on CPU, with inputs of fixed shape but for the batch,
            the tasks' Conv2d weights are folded into oneDNN's blocked layout for batches of 1 to
            ``max_batch`` (:meth:`liedeploy.AdapterBank.pack_convs`; ``pack_reason`` says how many
            layers, or why none). ``None``: not packed.
    """

    kind = "torch"
    file_suffix = ".safetensors"

    def __init__(self, model, input_specs: Sequence[TensorSpec], *, cache_bytes: Optional[int] = None,
                 device: str = "cpu", threads: Optional[int] = None, cache_policy: str = "frequency",
                 max_batch: Optional[int] = None):
        import torch

        from liedeploy.bank.adapter_bank import AdapterBank

        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.bank = AdapterBank(model, cache_bytes=cache_bytes, device=self.device, lazy=True, cache_policy=cache_policy)
        self._inputs = list(input_specs)
        self._channels_last = False  # 4-D float inputs given channels-last (packed convolutions, a safe model)
        self._out_specs: dict = {}
        self._out_specs[None] = self._probe(None)
        self._inputs = self._with_bounds(self._inputs)
        self.pack_reason = self._pack(max_batch)

    def _pack(self, max_batch: Optional[int]) -> str:
        """Fold the tasks' Conv2d weights into oneDNN's layout where that can run; says what was done."""
        from torch import nn

        from liedeploy.core.conv_pack import pack_status

        convs = sum(1 for m in self.bank.base.modules() if type(m) is nn.Conv2d)
        if not convs:
            return "no Conv2d layers"
        if self.device.type != "cpu":
            return "dense (packing is for CPU serving)"
        if not max_batch:
            return "dense (no batch bound was given to pack for)"
        if any(-1 in s.shape[1:] for s in self._inputs):
            return "dense (an input has a dynamic shape beyond the batch)"
        why = pack_status()
        if why != "ready":
            return f"dense ({why})"
        example = self._example()

        def run(model):
            import torch

            tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in example.items()}
            return model(tensors[self._inputs[0].name]) if len(self._inputs) == 1 else model(**tensors)

        packed = self.bank.pack_convs(run, batches=sorted({1, int(max_batch)}))
        if not packed:
            return f"dense ({self.bank.fusion})"
        if len(self._inputs) == 1 and len(self._inputs[0].shape) == 4 and self._inputs[0].datatype == "FP32":
            import torch

            from liedeploy.core.conv_pack import channels_last_safe

            shape = example[self._inputs[0].name].shape[1:]  # random values: zeros could hide a layout-dependent path
            x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
            self._channels_last = channels_last_safe(self.bank.base, x)
        return (f"{len(packed)} of {convs} Conv2d layers folded into oneDNN's blocked layout (batches 1-{max_batch})"
                + ("; inputs channels-last" if self._channels_last else "") + f"; {self.bank.fusion}")

    # -- registry -------------------------------------------------------------------------
    def discover(self, folder: str) -> dict:
        return discover_task_files(folder, self.file_suffix)

    def tasks(self) -> list:
        return self.bank.tasks

    def add(self, task: str, path: str) -> None:
        self.bank.add(task, path, replace=True)
        self._out_specs.pop(task, None)

    def remove(self, task: str) -> None:
        self.bank.remove(task)
        self._out_specs.pop(task, None)

    def prefetch(self, task: str) -> None:
        self.bank.prefetch(task)

    def is_resident(self, task: Optional[str]) -> bool:
        return task is None or self.bank.is_resident(task)

    # -- specs ------------------------------------------------------------------------------
    def inputs(self) -> list:
        return list(self._inputs)

    def _example(self) -> dict:
        return {s.name: np.zeros([1 if d == -1 else d for d in s.shape], dtype=s.dtype) for s in self._inputs}

    def _probe(self, task: Optional[str]) -> list:
        out = self.run(task, self._example())
        return [TensorSpec(n, _datatype(a), (-1,) + tuple(a.shape[1:])) for n, a in out.items()]

    def _with_bounds(self, specs: list) -> list:
        """The input specs, each integer input that feeds an embedding with the rows it may index.

        Found by running the example once with a hook on every ``nn.Embedding``: an input whose
        tensor (or a view of it) reaches an embedding gets ``bounds = (0, num_embeddings)``, so that
        an id out of range is refused with 400 before it can fail a whole batch.
        """
        import dataclasses

        import torch
        from torch import nn

        ints = [s for s in specs if np.dtype(s.dtype).kind in "iu"]
        if not ints:
            return specs
        example = self._example()
        tensors = {n: torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for n, a in example.items()}
        seen: dict = {}

        def hook(module, args):
            if args and isinstance(args[0], torch.Tensor):
                for name, t in tensors.items():
                    if args[0].data_ptr() == t.data_ptr() and args[0].numel() == t.numel():
                        seen[name] = min(seen.get(name, module.num_embeddings), module.num_embeddings)

        handles = [m.register_forward_pre_hook(hook) for m in self.bank.base.modules() if isinstance(m, nn.Embedding)]
        try:
            with torch.inference_mode():
                if len(self._inputs) == 1:
                    self.bank.base(tensors[self._inputs[0].name])
                else:
                    self.bank.base(**tensors)
        finally:
            for h in handles:
                h.remove()
        return [dataclasses.replace(s, bounds=(0, int(seen[s.name]))) if s.name in seen else s for s in specs]

    def outputs(self, task: Optional[str]) -> list:
        if task not in self._out_specs:
            entry = self.bank.registry.get(task)
            # a task that replaces no tensor whole has the base's outputs; otherwise run it once
            self._out_specs[task] = self._out_specs[None] if not entry.full else self._probe(task)
        return self._out_specs[task]

    # -- inference --------------------------------------------------------------------------
    def _call(self, task, inputs: dict) -> dict:
        import torch

        tensors = {n: torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for n, a in inputs.items()}
        if self._channels_last:  # packed convolutions then copy no activations between layouts
            tensors = {n: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                       for n, t in tensors.items()}
        rows = max((len(a) for a in inputs.values() if np.ndim(a)), default=1)
        with torch.inference_mode(), self.bank.lease(task, uses=max(1, rows)) as held:  # each sample is a use
            if len(self._inputs) == 1:
                out = held.model(tensors[self._inputs[0].name])
            else:
                out = held.model(**tensors)
        return out

    def run(self, task: Optional[str], inputs: dict) -> dict:
        return {n: _to_numpy(t) for n, t in flatten_named(self._call(task, inputs))}

    def run_mixed(self, tasks: Sequence[Optional[str]], inputs: dict) -> dict:
        return run_mixed_by_task(self.run, tasks, inputs)

    def stats(self) -> dict:
        s = self.bank.stats
        return {"registered": len(self.bank.registry), "resident": len(self.bank.resident),
                "resident_bytes": self.bank.cached_bytes, "hits": s["hits"], "misses": s["misses"],
                "evictions": s["evictions"], "loads": s["folds"], "load_seconds": s["fold_seconds"],
                "fold_fused": 1.0 if fold_path(self.device) == "fused" else 0.0, "not_kept": s["not_kept"],
                "packed_convs": len(self.bank.packed)}


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: served as FP32
        t = t.float()
    return t.cpu().numpy()


def _datatype(a: np.ndarray) -> str:
    from liedeploy.serving.specs import NUMPY_TO_DATATYPE

    return NUMPY_TO_DATATYPE.get(a.dtype, "FP32")
