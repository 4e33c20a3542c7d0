"""Core layer: the math (algebra), the config, target selection, attaching adapters, the per-model
adapter state, live merge/unmerge, named adapters and saving/loading adapters into a model.

Imports only :mod:`liedeploy.io` and the base modules (errors, version). Nothing is imported here,
so ``import liedeploy`` stays free of torch.
"""

__all__: list[str] = []
