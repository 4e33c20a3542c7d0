"""One backend protocol for serving: the torch bank, the ONNX Runtime bank and TensorRT implement it.

The serving layer (batcher, HTTP app, Ray replicas) talks to a backend only through
:class:`Backend`; it never reaches into a backend's private state. Inputs and outputs are
``{name: numpy array}`` with the batch as first axis. ``task=None`` is the base model.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

__all__ = ["Backend", "STATS_KEYS", "run_mixed_by_task", "discover_task_files", "BACKENDS", "register_backend", "get_backend_factory"]

# name -> factory(ServeConfig) -> Backend. The built-in ones (torch, ort, trt) are registered by
# liedeploy.serving.backends on first lookup; each imports its stack only when it is built.
BACKENDS: dict = {}


def register_backend(name: str, factory) -> None:
    """Make ``liedeploy serve --backend NAME`` build its backend with ``factory(cfg)``."""
    BACKENDS[name] = factory


def get_backend_factory(name: str):
    """The factory registered as ``name`` (the built-in backends are registered on first use)."""
    import liedeploy.serving.backends  # noqa: F401 (registers torch, ort, trt)

    return BACKENDS.get(name)


# what stats() returns (every backend, same keys; counters are totals since start). Neutral words:
# a "load" is whatever makes a task resident (a fold for torch, a session for ort, a refit for trt).
STATS_KEYS = ("registered", "resident", "resident_bytes", "hits", "misses", "evictions", "loads", "load_seconds")
# optional: "fold_fused" (1.0 when a torch backend folds with the fused kernel), "not_kept" (folds
# served once and not cached: the task was used less than what it would have evicted), "packed_convs"
# (Conv2d layers a torch backend folds into oneDNN's blocked layout)


@runtime_checkable
class Backend(Protocol):
    """What the serving layer needs from an inference engine holding one base and many tasks."""

    kind: str  # "torch", "ort", "trt"
    file_suffix: str  # the task files this backend reads from the adapters folder (".safetensors", ".onnx")

    def discover(self, folder: str) -> dict:
        """``{task: path}`` of the task files in ``folder`` that this backend can serve."""

    def tasks(self) -> list: ...

    def add(self, task: str, path: str) -> None:
        """Register (or re-register) ``task`` from an adapter file; LieError if unusable."""

    def remove(self, task: str) -> None: ...

    def prefetch(self, task: str) -> None:
        """Fold / load ``task`` now, so that its first request does not wait for it."""

    def is_resident(self, task: Optional[str]) -> bool:
        """Whether a call for ``task`` runs without a fold (the scheduler prefers these)."""

    def inputs(self) -> list: ...

    def outputs(self, task: Optional[str]) -> list: ...

    def run(self, task: Optional[str], inputs: dict) -> dict:
        """Outputs for a batch of one task (``None``: the base)."""

    def run_mixed(self, tasks: Sequence[Optional[str]], inputs: dict) -> dict:
        """Outputs for a batch whose samples each name their task."""

    def stats(self) -> dict:
        """Counters and gauges with the keys of :data:`STATS_KEYS`."""


def run_mixed_by_task(run, tasks: Sequence[Optional[str]], inputs: dict) -> dict:
    """A mixed batch through ``run(task, inputs)``: samples grouped by task, outputs in input order.

    Tasks whose outputs have other shapes per sample (a head of their own) cannot share a batch.
    """
    from liedeploy.core.mixed import run_mixed

    n = len(next(iter(inputs.values()))) if inputs else len(tasks)
    return run_mixed(run, tasks, n, lambda idx: {k: a[idx] for k, a in inputs.items()})


def discover_task_files(folder: str, suffix: str) -> dict:
    """``{task: path}`` for the files of ``folder`` named ``<task><suffix>`` (hidden files skipped)."""
    import os

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(suffix) and not f.startswith(".") and len(f) > len(suffix):
            out[f[: -len(suffix)]] = os.path.join(folder, f)
    return out
