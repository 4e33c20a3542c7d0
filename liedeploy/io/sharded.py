"""Sharded outputs (``*.safetensors.index.json`` + shards), one copy for every tool that writes them
(``merge``, ``prune``): the base's layout checked, output shard names chosen, the index written and
everything published through a :class:`~liedeploy.io.atomic.Staging` folder, with the index as
the commit point and the shards of an earlier output in the same place removed afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Mapping, Optional, Sequence

from liedeploy.errors import AdapterFileError, LieError
from liedeploy.io.atomic import safe_file_name
from liedeploy.io.safetensors_header import resolve_shards

__all__ = ["layout_of", "shard_names", "publish_sharded"]


def layout_of(base: str, files: Mapping[str, object], shards: Mapping[str, Optional[Sequence[str]]]) -> tuple[dict, dict]:
    """``({name: shape}, {name: dtype})`` over the opened shards of ``base``.

    Refuses (one sentence naming ``base``) an index that names a tensor in a shard which lacks it,
    and a tensor stored in more than one shard.

    Args:
        files: ``{shard path: opened SafetensorsFile}``.
        shards: ``{shard path: tensor names the index assigns to it}`` (``None`` for a single file).
    """
    shapes, dtypes = {}, {}
    for s, f in files.items():
        if shards.get(s) is not None:
            lacking = sorted(set(shards[s]) - set(f.header))
            if lacking:
                raise AdapterFileError(f"{base}: names tensor {lacking[0]} in shard {os.path.basename(s)}, which lacks it")
        for k, v in f.header.items():
            if k in shapes:
                raise AdapterFileError(f"{base}: tensor {k} is stored in more than one shard")
            shapes[k], dtypes[k] = tuple(v["shape"]), v["dtype"]
    return shapes, dtypes


def shard_names(shards: Sequence[str], out_dir: str) -> dict:
    """``{base shard path: output file name}``: the base's shard names (reduced to plain file
    names), or fresh ones where a file of that name already exists in ``out_dir``."""
    token = secrets.token_hex(4)
    names = {}
    for s in shards:
        name = safe_file_name(os.path.basename(s), "shard file name")
        if os.path.lexists(os.path.join(out_dir, name)):
            stem, ext = os.path.splitext(name)
            name = f"{stem}.{token}{ext}"
        names[s] = name
    return names


def _old_outputs(out_index: str) -> list:
    """File names an existing OUT index uses (the old output, removed after the new one is in place)."""
    if not os.path.isfile(out_index):
        return []
    try:
        return sorted(os.path.basename(p) for p in resolve_shards(out_index))
    except LieError:
        return []


def publish_sharded(stage, index: dict, names: Mapping[str, str], shards: Mapping[str, Sequence[str]],
                    inputs: Sequence[str], *, extra: Optional[Mapping[str, str]] = None, hook=None) -> None:
    """Write the output index (the base's, with its ``weight_map`` pointing at the new shard names)
    and publish every shard, the index last; shards of an earlier output at OUT that the new one
    does not use are removed afterwards (never an input).

    Args:
        stage: the open :class:`~liedeploy.io.atomic.Staging` of OUT (the shards are in it already).
        index: the base's parsed index (copied, not modified).
        names: ``{base shard path: output name}`` (from :func:`shard_names`).
        shards: ``{base shard path: [tensor names]}``.
        inputs: the run's input files (never removed).
        extra: ``{tensor name: output name}`` for tensors the output adds.
        hook: a test hook called between publishing steps.
    """
    index = dict(index)
    index["weight_map"] = {k: names[s] for s, ks in shards.items() for k in ks}
    index["weight_map"].update(extra or {})
    with open(stage.path(stage.name), "w") as fh:
        json.dump(index, fh, indent=2)
    protected = {os.path.abspath(p) for p in inputs}
    old = [n for n in _old_outputs(stage.out) if n not in names.values()
           and os.path.abspath(os.path.join(stage.folder, n)) not in protected]
    stage.publish(list(names.values()), last=stage.name, obsolete=old, hook=hook)
