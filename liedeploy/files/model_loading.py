"""Build a model from ``PKG.MOD:FACTORY`` and load safetensors weights strictly (torch only).

Used by ``liedeploy export`` and ``liedeploy serve``. ``--model`` runs code by design: the module
is imported and the factory called; the current folder is searched after installed packages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import importlib
import os
import sys

from liedeploy.errors import ConfigError, LieError

if TYPE_CHECKING:  # torch is imported where a model is built: parsing a spec needs none
    from torch import nn

__all__ = ["build_model", "load_weights_strict", "parse_model_spec", "load_hf_model", "load_hf_architecture"]


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``"pkg.mod:factory"`` -> ``("pkg.mod", "factory")``, or ConfigError (a usage error)."""
    mod_name, sep, attr = str(spec).partition(":")
    ident = lambda s: bool(s) and all(p.isidentifier() for p in s.split("."))  # noqa: E731
    if not sep or not ident(mod_name) or not ident(attr):
        raise ConfigError(f"--model must look like PKG.MOD:FACTORY (dotted Python names), got {spec!r}")
    return mod_name, attr


def build_model(spec: str, kwargs: dict, weights: str) -> "nn.Module":
    """``build_model("mypkg.models:resnet", {}, "w.safetensors")`` -> model in eval mode."""
    mod_name, attr = parse_model_spec(spec)
    # the current folder is searched last: a planted onnx.py (or torch.py) never shadows the
    # installed package. Importing FACTORY's module runs its code: that is what --model asks for.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise LieError(f"cannot import {mod_name} ({exc})") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise LieError(f"{mod_name} has no attribute {attr}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise LieError(f"{spec} is not callable")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - user code: its failure reduced to one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise LieError(f"{spec}(**{kwargs}) failed: {type(exc).__name__}: {first[:300]}") from None
    from torch import nn

    if not isinstance(model, nn.Module):
        raise LieError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    load_weights_strict(model, weights)
    return model.eval()


def load_weights_strict(model: "nn.Module", weights: str) -> None:
    """Load every tensor of ``weights`` into ``model``; a missing or unexpected key is an error."""
    from safetensors.torch import load_file

    from liedeploy.io.safetensors_io import SafetensorsFile, resolve_shards

    shards = resolve_shards(weights) if weights.endswith(".index.json") else {weights: None}
    sd = {}
    for shard in shards:
        with SafetensorsFile(shard) as f:  # refuses non-safetensors and special files, never unpickles
            sd.update(load_file(f.fd_path))
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing:
        raise LieError(f"{weights}: missing key {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise LieError(f"{weights}: unexpected key {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise LieError(f"{weights}: tensor {k} has shape {list(v.shape)}, the model expects {list(own[k].shape)}")
    model.load_state_dict(sd, strict=True)


def load_hf_model(folder: str, tokenizer: Optional[str] = None):
    """``(causal LM, tokenizer)`` from a transformers folder (config, safetensors weights, tokenizer),
    read from disk only (``local_files_only``: nothing downloads). One sentence if it cannot be used."""
    import os

    from liedeploy.errors import ConfigError, require

    transformers = require("transformers", "serve", "liedeploy serve --hf-model")
    transformers.utils.logging.disable_progress_bar()
    if not os.path.isdir(folder):
        raise ConfigError(f"--hf-model {folder}: not a folder")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer or folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--hf-model {folder}: cannot load a causal LM and its tokenizer "
                          f"({str(exc).strip().splitlines()[0][:200]})") from None
    return model, tok


def load_hf_architecture(folder: str):
    """The model class a transformers folder's config names (``architectures[0]``: a causal LM, a
    sequence classifier...), weights read from disk only, with ``use_cache=False`` (an export takes
    tensors, not cache objects). One sentence if it cannot be used."""
    import os

    from liedeploy.errors import ConfigError, require

    transformers = require("transformers", "onnx", "export --hf-model")
    transformers.utils.logging.disable_progress_bar()  # the CLI prints its own one-line report
    if not os.path.isdir(folder):
        raise ConfigError(f"--hf-model {folder}: not a folder")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        names = list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, names[0], None) if names else None
        if cls is None:
            cls = transformers.AutoModel
        config.use_cache = False
        model = cls.from_pretrained(folder, config=config, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--hf-model {folder}: cannot load the model "
                          f"({str(exc).strip().splitlines()[0][:200]})") from None
    return model
