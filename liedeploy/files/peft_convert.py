"""PEFT HiRA adapters <-> liedeploy first_order adapters (``liedeploy convert``). No peft import.

HiRA is W + W * dW with dW = B @ A: exactly liedeploy's first_order map with scale 1. PEFT stores
the factors per layer kind (``adapter_model.safetensors``, keys ``base_model.model.<module>.hira_*``):

| layer | PEFT factors | dW (as the weight is stored) | liedeploy B, A |
|---|---|---|---|
| ``nn.Linear`` (out, in) | ``hira_A`` (r, in), ``hira_B`` (out, r) | B @ A | B, A |
| transformers ``Conv1D`` (in, out) | ``hira_A`` (r, in), ``hira_B`` (out, r) | (B @ A)^T | A^T, B^T |
| ``nn.Embedding`` (num, dim) | ``hira_embedding_A`` (r, num), ``hira_embedding_B`` (dim, r) | (B @ A)^T | A^T, B^T |
| ``ConvNd`` (out, in, *k) | ``hira_A`` (r, in, *k), ``hira_B`` (out, r, 1...) | B . A over r | B (out, r), A (r, in*k) |

A square 2-D weight is a Conv1D when the PEFT config says ``fan_in_fan_out`` (as for GPT-2), else a
Linear. Going back to PEFT needs each target's layer kind: liedeploy records it in the adapter's
``layer_types`` metadata; an adapter without it is refused for the layers its shapes cannot tell.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Optional

from liedeploy.errors import AdapterFileError, ConfigError, LieError

__all__ = ["from_peft", "to_peft", "layer_types"]

_PREFIX = "base_model.model."


def layer_types(model) -> dict:
    """``{parameter name: layer kind}`` for the adapted parameters of ``model`` (for ``to_peft``)."""
    from liedeploy.core.adapt import iter_adapters

    out = {}
    for P, module, attr, _ in iter_adapters(model):
        kind = type(module).__name__.replace("Parametrized", "")
        out[P] = kind
    return out


def _read_peft(folder: str) -> tuple[dict, dict]:
    from liedeploy.io.safetensors_header import read_regular

    cfg_path = os.path.join(folder, "adapter_config.json")
    w_path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.lexists(cfg_path):
        raise AdapterFileError(f"{folder}: no adapter_config.json (a PEFT adapter folder holds one)")
    raw = read_regular(cfg_path, 1 << 20, "PEFT adapter config")  # a FIFO or a device: refused at once, never read
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise AdapterFileError(f"{cfg_path}: not valid JSON") from None
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "")).upper() != "HIRA":
        raise AdapterFileError(f"{cfg_path}: peft_type is {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}; "
                               "only HiRA adapters (W + W * BA) convert to a Lie first_order adapter")
    from safetensors.torch import load_file

    from liedeploy.io.safetensors_header import SafetensorsFile

    with SafetensorsFile(w_path) as f:  # refuses pickles, special files, malformed headers
        tensors = load_file(f.fd_path)
    return cfg, tensors


def _is_saved_module(mod: str, modules_to_save) -> bool:
    """Whether ``mod`` is one of PEFT's ``modules_to_save`` (matched by name or dotted suffix, as PEFT does)."""
    return any(mod == m or mod.endswith("." + m) for m in (modules_to_save or []))


def from_peft(peft_dir: str, base: str, out: str, *, name: Optional[str] = None) -> dict:
    """Convert a PEFT HiRA adapter folder into a first_order adapter file for ``base``.

    PEFT's ``modules_to_save`` tensors (a classification head PEFT adds for ``SEQ_CLS``) become
    format "2" full tensors; PEFT's ``task_type`` and ``base_model_name_or_path`` are kept in the
    file's ``peft`` metadata so that ``to_peft`` writes them back.

    Returns a summary ``{"out", "targets", "layer_types", "full"}``.
    """
    from liedeploy._version import __version__
    from re import escape as re_exact

    from liedeploy.core.config import LieConfig
    from liedeploy.io.adapter_format import write_adapter_file
    from liedeploy.io.safetensors_io import BaseTensors

    import torch

    cfg, tensors = _read_peft(peft_dir)
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    base_tensors = BaseTensors(base)
    shapes = base_tensors.shapes
    modules: dict = {}
    full: dict = {}
    saved = cfg.get("modules_to_save") if isinstance(cfg.get("modules_to_save"), list) else []
    for key, t in tensors.items():
        if not key.startswith(_PREFIX):
            raise AdapterFileError(f"{peft_dir}: tensor {key} is not a PEFT adapter tensor (base_model.model....)")
        mod, _, part = key[len(_PREFIX):].rpartition(".")
        if part not in ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"):
            P = key[len(_PREFIX):].replace(".modules_to_save.default.", ".")
            owner = P.rpartition(".")[0]
            if not _is_saved_module(owner, saved):
                raise AdapterFileError(f"{peft_dir}: tensor {key} is neither a HiRA factor nor a tensor of a module in "
                                       "modules_to_save")
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise AdapterFileError(f"{peft_dir}: tensor {key} holds non-finite or non-floating values")
            full[P] = t.contiguous()
            continue
        if t.dim() < 2:
            raise AdapterFileError(f"{peft_dir}: tensor {key} has shape {list(t.shape)}; a HiRA factor has at least 2 axes")
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"{peft_dir}: tensor {key} holds non-finite values (NaN or inf); nothing was written")
        modules.setdefault(mod, {})[part.replace("embedding_", "")] = (t, "embedding" in part)
    out_t, targets, hashes, kinds = {}, {}, {}, {}
    for mod, parts in sorted(modules.items()):
        if set(parts) != {"hira_A", "hira_B"}:
            raise AdapterFileError(f"{peft_dir}: module {mod} lacks one of its two HiRA factors")
        (A, emb), (B, _) = parts["hira_A"], parts["hira_B"]
        P = f"{mod}.weight"
        if P not in shapes:
            raise AdapterFileError(f"{peft_dir}: module {mod} has no weight {P} in the base {base}")
        W = shapes[P]
        A, B = A.float(), B.float()
        if emb:
            kind, lie_B, lie_A = "Embedding", A.t(), B.t()
        elif A.dim() > 2:
            kind, lie_B, lie_A = f"Conv{A.dim() - 2}d", B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1)
        else:
            linear_fits = W == (B.shape[0], A.shape[1])
            conv1d_fits = W == (A.shape[1], B.shape[0])
            if conv1d_fits and (fan_in_fan_out or not linear_fits):
                kind, lie_B, lie_A = "Conv1D", A.t(), B.t()
            elif linear_fits:
                kind, lie_B, lie_A = "Linear", B, A
            else:
                raise AdapterFileError(f"{peft_dir}: factors of {mod} (A {list(A.shape)}, B {list(B.shape)}) do not fit "
                                       f"the base weight {list(W)}")
        if tuple(lie_B.shape[:1]) != W[:1] or lie_A.shape[1] != math.prod(W[1:]):
            raise AdapterFileError(f"{peft_dir}: factors of {mod} do not fit the base weight {list(W)}")
        out_t[P] = (lie_B.contiguous(), lie_A.contiguous())
        targets[P] = {"shape": list(W), "scale": 1.0}
        hashes[P] = base_tensors.sha256(P)
        kinds[P] = kind
    if not targets and not full:
        raise AdapterFileError(f"{peft_dir}: holds no HiRA factors")
    ranks = Counter(out_t[P][0].shape[1] for P in targets) or Counter({int(cfg.get("r") or 8): 1})
    r = int(ranks.most_common(1)[0][0])
    config = LieConfig(r=r, alpha=float(r), expmap="first_order", targets=sorted(targets) or None,
                       modules_to_save=sorted({P.rpartition(".")[0] for P in full}) or None,
                       rank_pattern={re_exact(P): int(out_t[P][0].shape[1]) for P in targets if out_t[P][0].shape[1] != r},
                       alpha_pattern={re_exact(P): float(out_t[P][0].shape[1]) for P in targets if out_t[P][0].shape[1] != r})
    write_adapter_file(out, out_t, targets=targets, base_sha256=hashes, expmap="first_order",
                       config_json=config.to_json(), name=name or os.path.basename(os.path.normpath(peft_dir)),
                       layer_types=kinds, created_by=f"liedeploy {__version__} (from PEFT HiRA)", full=full,
                       extra_metadata={"peft": json.dumps({k: cfg.get(k) for k in ("task_type", "base_model_name_or_path")})},
                       inputs=[base, os.path.join(peft_dir, "adapter_model.safetensors")])
    return {"out": out, "targets": sorted(targets), "layer_types": kinds, "full": sorted(full)}


def to_peft(adapter: str, out_dir: str, *, task_type: Optional[str] = None,
            base_model_name_or_path: Optional[str] = None) -> dict:
    """Write a first_order adapter file as a PEFT HiRA adapter folder (``PeftModel.from_pretrained``
    and ``AutoPeftModelFor...`` load it).

    Full tensors (format "2": a head of the task's own) become PEFT's ``modules_to_save``.
    ``task_type`` (``SEQ_CLS``, ``CAUSAL_LM``...) and ``base_model_name_or_path`` (what
    ``AutoPeftModel`` loads the base from) default to what ``from_peft`` recorded in the file.
    """
    from safetensors.torch import save_file

    from liedeploy.core.adapter_file import read_adapter
    from liedeploy.io.atomic import Staging

    af = read_adapter(adapter)
    if af.expmap != "first_order":
        raise LieError(f"{adapter}: uses the exact map W * exp(dW), which PEFT has no layer for; only first_order "
                       "adapters (HiRA: W + W * dW) convert to PEFT")
    try:
        recorded = json.loads(af.metadata.get("peft", "{}"))
    except ValueError:
        recorded = {}
    recorded = recorded if isinstance(recorded, dict) else {}
    task_type = task_type or recorded.get("task_type")
    base_model_name_or_path = base_model_name_or_path or recorded.get("base_model_name_or_path")
    try:
        kinds = json.loads(af.metadata.get("layer_types", "{}"))
    except ValueError:
        kinds = {}
    tensors, modules, ranks, conv1d = {}, [], {}, False
    for P, info in sorted(af.targets.items()):
        B, A = (t.float() for t in af.factors[P])
        B = B * info["scale"]
        shape = info["shape"]
        mod = P[: -len(".weight")] if P.endswith(".weight") else None
        if mod is None:
            raise LieError(f"{adapter}: target {P} is not a module's weight; PEFT adapts module weights only")
        kind = kinds.get(P) or (f"Conv{len(shape) - 2}d" if len(shape) > 2 else None)
        if kind is None:
            raise LieError(f"{adapter}: cannot tell whether {P} is a Linear, a Conv1D or an Embedding (the file has no "
                           "layer_types); save it again with this liedeploy version")
        key = f"{_PREFIX}{mod}"
        if kind == "Linear":
            tensors[f"{key}.hira_A"], tensors[f"{key}.hira_B"] = A, B
        elif kind == "Conv1D":
            tensors[f"{key}.hira_A"], tensors[f"{key}.hira_B"] = B.t(), A.t()
            conv1d = True
        elif kind == "Embedding":
            tensors[f"{key}.hira_embedding_A"], tensors[f"{key}.hira_embedding_B"] = B.t(), A.t()
        elif kind.startswith("Conv") and kind.endswith("d") and len(shape) > 2:
            r = B.shape[1]
            tensors[f"{key}.hira_A"] = A.reshape(r, *shape[1:])
            tensors[f"{key}.hira_B"] = B.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        else:
            raise LieError(f"{adapter}: target {P} is a {kind}, which PEFT HiRA does not adapt")
        modules.append(mod)
        ranks[mod] = int(B.shape[1])
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    config = {
        "peft_type": "HIRA", "r": r, "target_modules": modules, "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "fan_in_fan_out": conv1d, "hira_dropout": 0.0, "init_weights": True, "inference_mode": True,
        "modules_to_save": sorted({P.rpartition(".")[0] for P in af.full}) or None, "exclude_modules": None,
        "layers_to_transform": None, "layers_pattern": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None, "task_type": task_type,
    }
    for P, t in af.full.items():  # PEFT keeps modules_to_save tensors under their own names
        tensors[f"{_PREFIX}{P}"] = t
    if not os.path.isdir(out_dir):
        try:
            os.makedirs(out_dir)
        except OSError as exc:
            raise ConfigError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from None
    with Staging(os.path.join(out_dir, "adapter_config.json"), inputs=[adapter]) as stage:
        save_file({k: v.contiguous() for k, v in tensors.items()}, stage.path("adapter_model.safetensors"))
        with open(stage.path("adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        stage.publish(["adapter_model.safetensors", "adapter_config.json"], last="adapter_config.json")
    return {"out": out_dir, "targets": modules, "r": r}
