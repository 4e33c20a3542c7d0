"""ONNX that generates: a task merged into a transformers causal LM, exported as a decoder with KV
cache by onnxruntime-genai's model builder, and checked by greedy generation against torch.

``export_generator(model_dir, adapter, out)``:

1. the adapter is merged into the model folder's safetensors weights (``merge_files``: sharded
   bases, format "2" full tensors, the base hash checks), beside a copy of its config and tokenizer;
2. onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder``, its
   documented command line) writes ``model.onnx`` (+ ``model.onnx.data``): ``input_ids``,
   ``attention_mask`` and ``past_key_values.N.key/value`` in, ``logits`` and ``present.N.*`` out,
   batch and sequence dynamic, plus ``genai_config.json`` and the tokenizer files;
3. the export is kept only if greedy generation of ``check_tokens`` tokens in onnxruntime-genai
   equals the merged model's ``generate()`` in torch, token for token, on fixed prompts.

Why onnxruntime-genai's builder and not Optimum: Optimum's ONNX exporter (``optimum-onnx`` 0.1)
pins ``transformers<4.58`` and would downgrade the transformers this project runs with; the
builder installs beside it and its output runs with the ``onnxruntime-genai`` runtime (a
generation loop, KV cache management, sampling) as well as with plain ONNX Runtime.

Everything is written through a staging folder and published with ``genai_config.json`` last:
a failed build or check leaves nothing at ``out``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

from liedeploy.errors import ConfigError, ExportError, require
from liedeploy.io.atomic import Staging

__all__ = ["export_generator", "merged_model_folder"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _weights_of(model_dir: str) -> str:
    for name in _WEIGHTS[::-1]:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return path
    raise ConfigError(f"--hf-model {model_dir}: no model.safetensors (or model.safetensors.index.json) in it")


def merged_model_folder(model_dir: str, adapter: Optional[str], folder: str) -> str:
    """A transformers folder at ``folder``: ``model_dir``'s config and tokenizer files, and its weights
    with ``adapter`` merged (or copied, without one). Returns ``folder``."""
    from liedeploy.files.file_merge import merge_files

    weights = _weights_of(model_dir)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(model_dir):
        src = os.path.join(model_dir, name)
        if os.path.isfile(src) and not name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt")):
            shutil.copy2(src, os.path.join(folder, name))
    out = os.path.join(folder, os.path.basename(weights))
    if adapter:
        merge_files(weights, [adapter], out, progress=False)
    elif weights.endswith(".index.json"):
        with open(weights) as f:
            shards = set(json.load(f)["weight_map"].values())
        for shard in shards | {os.path.basename(weights)}:
            shutil.copy2(os.path.join(model_dir, shard), os.path.join(folder, shard))
    else:
        shutil.copy2(weights, out)
    return folder


def _model_type(model_dir: str) -> str:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return str(json.load(f).get("model_type", ""))
    except (OSError, ValueError):
        raise ConfigError(f"--hf-model {model_dir}: no readable config.json") from None


def _build(src: str, dst: str, cache: str, precision: str, provider: str) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", src, "-o", dst, "-p", precision,
           "-e", provider, "-c", cache]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        hint = (" (the generation export takes the architectures the builder knows, e.g. Llama, Mistral, Qwen, "
                "Phi, Gemma; export logits with --input NAME:DATATYPE:SHAPE instead)"
                if "not currently supported" in last else "")
        raise ExportError(f"onnxruntime-genai's model builder failed: {last[:300]}{hint}")


def _prompts(vocab: int, eos: set) -> list:
    usable = [t for t in range(1, vocab) if t not in eos]
    return [usable[:8], usable[len(usable) // 2: len(usable) // 2 + 3]]


def _check(onnx_dir: str, merged_dir: str, tokens: int) -> dict:
    """Greedy ``tokens`` tokens in onnxruntime-genai and in torch, on fixed prompts; token for token."""
    import numpy as np
    import torch
    import onnxruntime_genai as og
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ref = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).eval()
    eos = ref.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    pad = ref.generation_config.pad_token_id
    pad = pad if pad is not None else (min(eos) if eos else 0)
    model = og.Model(onnx_dir)
    checks, ok = [], True
    for ids in _prompts(ref.config.vocab_size, eos):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([ids], dtype=np.int32))
        got = []
        while not gen.is_done() and len(got) < tokens:
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        with torch.no_grad():
            x = torch.tensor([ids])
            want = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, do_sample=False,
                                pad_token_id=pad)[0, len(ids):].tolist()
        same = got == want
        ok &= same
        checks.append({"prompt": ids, "tokens_onnx": got, "tokens_torch": want, "equal": same})
    return {"ok": ok, "greedy_tokens": tokens, "checks": checks}


def export_generator(model_dir: str, adapter: Optional[str], out: str, *, check_tokens: int = 32,
                     precision: str = "fp32", provider: str = "cpu") -> dict:
    """Merge ``adapter`` (or none: the base) into the transformers causal LM at ``model_dir`` and
    write an ONNX decoder with KV cache, runnable by onnxruntime-genai, into the folder ``out``.

    Returns the report (also written as ``out/export.report.json``). Raises ExportError when the
    builder fails or generation differs from torch (nothing is written then).
    """
    require("onnxruntime_genai", "genai", "export --onnx --hf-model (a decoder that generates)")
    require("transformers", "genai", "export --onnx --hf-model")
    if not os.path.isdir(model_dir):
        raise ConfigError(f"--hf-model {model_dir}: not a folder")
    kind = _model_type(model_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{out}: the generation export writes a folder, and this is a file")
    os.makedirs(out, exist_ok=True)
    inputs: Sequence[str] = [adapter] if adapter else []
    with Staging(os.path.join(out, "genai_config.json"), inputs=list(inputs)) as stage, \
            tempfile.TemporaryDirectory(prefix=".liedeploy-genai-", dir=out) as work:
        merged = merged_model_folder(model_dir, adapter, os.path.join(work, "merged"))
        built = os.path.join(work, "onnx")
        _build(merged, built, os.path.join(work, "cache"), precision, provider)
        report = _check(built, merged, check_tokens)
        if not report["ok"]:
            bad = next(c for c in report["checks"] if not c["equal"])
            raise ExportError(f"the generation export disagrees with torch: greedy tokens {bad['tokens_onnx'][:8]}... "
                              f"vs {bad['tokens_torch'][:8]}... for prompt {bad['prompt']}; nothing was written")
        for name in os.listdir(built):
            shutil.move(os.path.join(built, name), stage.path(name))
        report.update({"model_type": kind, "precision": precision, "execution_provider": provider,
                       "adapter": os.path.abspath(adapter) if adapter else None,
                       "builder": "onnxruntime_genai.models.builder"})
        with open(stage.path("export.report.json"), "w") as f:
            json.dump(report, f, indent=2)
        stage.publish_all(last="genai_config.json")
    report["files"] = sorted(os.listdir(out))
    return report
