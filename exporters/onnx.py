"""ONNX export of merged models, checked in ONNX Runtime before it is kept.

``export_onnx(model, example_inputs, path)``: a model with live Lie adapters is merged first (on a
copy), so the graph is the base architecture with folded weights and zero adapter overhead. The
export uses torch.onnx's dynamo exporter at an opset TensorRT's parser accepts (18 by default),
external data past 2 GB, optional fp16. Every export is checked: ``onnx.checker``, then ONNX
Runtime (CPU) against torch on the same random inputs (and on a second batch size when the batch
axis is dynamic). Beyond tolerance the export is refused and nothing is left at ``path``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from liedeploy.core.adapt import adapted_names
from liedeploy.io.atomic import Staging
from liedeploy.core.outputs import flatten_named, flatten_outputs
from liedeploy.errors import ConfigError, ExportError, require
from liedeploy.core.merge import merge_

__all__ = ["export_onnx", "verify_onnx", "keyword_model", "DEFAULT_TOLERANCE", "check_export_inputs", "require_onnx", "quiet_export"]

DEFAULT_OPSET = 18
# (atol, rtol) per export dtype
DEFAULT_TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 2e-2)}
_TWO_GB = 2 * 1024**3


def require_onnx(module: str):
    return require(module, "onnx", "ONNX export")


def _random_like(t: torch.Tensor, batch, seed: int, axes: Sequence[int] = (0,)) -> torch.Tensor:
    """Random values shaped like ``t``; ``batch`` (an int for axis 0, or ``{axis: size}``) resizes the
    dynamic ``axes``. An integer example of all ones (an attention mask) stays all ones."""
    g = torch.Generator().manual_seed(seed)
    shape = list(t.shape)
    sizes = {0: batch} if isinstance(batch, int) else dict(batch or {})
    for axis, size in sizes.items():
        if axis in axes and axis < len(shape):
            shape[axis] = size
    if t.is_floating_point():
        return torch.randn(shape, generator=g).to(t.dtype)
    if t.numel() and bool((t == 1).all()):
        return torch.ones(shape, dtype=t.dtype)
    high = max(2, int(t.max().item()) + 1) if t.numel() else 2
    return torch.randint(0, high, shape, generator=g, dtype=t.dtype)


def verify_onnx(
    path: str,
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    batches: Sequence[Optional[int]] = (None,),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    feeds_extra: Optional[dict] = None,
    run_options=None,
    session=None,
    dynamic_axes: Optional[Sequence[Sequence[int]]] = None,
) -> dict:
    """Run the ONNX file in ONNX Runtime (CPU) and torch on the same random inputs.

    ``batches``: per check, ``None`` (the example shapes), a batch size, or ``{axis: size}`` for the
    ``dynamic_axes`` of each input (default: axis 0 of every input).
    Returns a report ``{"ok", "atol", "rtol", "checks": [{"batch", "outputs": [{max_abs, max_rel}]}]}``;
    ``ok`` is False if any element is beyond ``atol + rtol * |torch|``.
    """
    ort = require_onnx("onnxruntime")
    sess = session or ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()][: len(example_inputs)]
    report = {"ok": True, "atol": atol, "rtol": rtol, "checks": []}
    for i, batch in enumerate(batches):
        inputs = [_random_like(t, batch, 1234 + i + 17 * j, dynamic_axes[j] if dynamic_axes else (0,))
                  for j, t in enumerate(example_inputs)]
        with torch.no_grad():
            ref = [t.float().numpy() for t in flatten_outputs(model(*inputs))]
        feeds = {n: t.numpy() for n, t in zip(names, inputs)}
        feeds.update(feeds_extra or {})
        got = sess.run(None, feeds, run_options=run_options) if run_options is not None else sess.run(None, feeds)
        outs = []
        for r, g in zip(ref, got):
            g = np.asarray(g, dtype=np.float32)
            if g.shape != r.shape:
                outs.append({"shape_torch": list(r.shape), "shape_onnx": list(g.shape), "ok": False})
                report["ok"] = False
                continue
            diff = np.abs(g - r)
            max_abs = float(diff.max()) if diff.size else 0.0
            max_rel = float((diff / np.maximum(np.abs(r), 1e-6)).max()) if diff.size else 0.0
            ok = bool(np.all(diff <= atol + rtol * np.abs(r)))
            outs.append({"max_abs": max_abs, "max_rel": max_rel, "ok": ok})
            report["ok"] &= ok
        if len(got) != len(ref):
            report["ok"] = False
            outs.append({"error": f"torch gave {len(ref)} outputs, ONNX Runtime {len(got)}"})
        report["checks"].append({"batch": int(inputs[0].shape[0]) if inputs[0].dim() else None,
                                 "shapes": [list(t.shape) for t in inputs], "outputs": outs})
    return report


def check_export_inputs(model: nn.Module, example_inputs: tuple) -> None:
    """Refuse, in one sentence, a model the exporter cannot take or an example input that does not fit.

    Runs the model once on the example inputs (as the exporter would) and looks at its output.
    """
    try:
        with torch.no_grad():
            out = model(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - the model's own error, reduced to one line
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in example_inputs)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(
            f"the model does not accept the example input {shapes}: {type(exc).__name__}: {first[:300]} "
            "(check --input-shape and --input-dtype)"
        ) from None
    cache = _find_cache(out)
    if cache is not None:
        raise ExportError(
            f"the model returns a transformers cache ({cache}), which ONNX export cannot take: build it with "
            "use_cache=False (for example --model-kwargs '{\"use_cache\": false}' or config.use_cache = False)"
        )
    if not flatten_outputs(out):
        raise ExportError(f"the model returned {type(out).__name__}, which holds no tensor to export")


def _find_cache(out: Any) -> Optional[str]:
    """Name of a transformers Cache object inside a model output, if any."""
    if out is None or isinstance(out, torch.Tensor):
        return None
    kind = type(out).__name__
    if kind.endswith("Cache") and hasattr(out, "get_seq_length"):
        return kind
    values = out.values() if isinstance(out, dict) else (out if isinstance(out, (list, tuple)) else ())
    if hasattr(out, "to_tuple") and not isinstance(out, (list, tuple)):
        values = list(out.values()) if hasattr(out, "values") else out.to_tuple()
    for v in values:
        hit = _find_cache(v)
        if hit:
            return hit
    return None


@contextlib.contextmanager
def quiet_export():
    """Silence the exporter's progress prints and warnings (the check report says what matters)."""
    import warnings

    import torch.onnx._internal.exporter._registration  # noqa: F401  (its import-time warnings, silenced below)

    names = ["torch.onnx", "onnxscript", "onnx_ir"] + [n for n in logging.root.manager.loggerDict
                                                      if n.startswith(("torch.onnx", "onnxscript", "onnx_ir"))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_options(opset, fp16: bool, atol, rtol, quantize, calibration) -> tuple[str, float, float]:
    """``(export dtype, atol, rtol)`` (the dtype's default tolerances where not given); ConfigError otherwise."""
    if not 7 <= int(opset) <= 23:
        raise ConfigError(f"opset must be between 7 and 23 (TensorRT's parser accepts <= 20), got {opset}")
    kind = "fp16" if fp16 else "fp32"
    d_atol, d_rtol = DEFAULT_TOLERANCE[kind]
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize must be 'int8', got {quantize!r}")
    if quantize and (fp16 or calibration is None):
        raise ConfigError("--quantize int8 needs --calibration INPUTS.npy and an fp32 export (not --fp16)")
    return kind, d_atol if atol is None else atol, d_rtol if rtol is None else rtol


def _torch_export(prepared: nn.Module, example_inputs: tuple, path: str, *, opset, names, dynamic_shapes,
                  external_data: bool, optimize: bool, output_names: Optional[Sequence[str]] = None) -> None:
    """torch.onnx's dynamo exporter, quiet, saved at ``path``."""
    with torch.no_grad(), quiet_export():
        program = torch.onnx.export(prepared, example_inputs, dynamo=True, opset_version=int(opset), input_names=names,
                                    output_names=list(output_names) if output_names else None,
                                    dynamic_shapes=dynamic_shapes, external_data=external_data, optimize=optimize)
        program.save(path, external_data=external_data)


def _refuse_mismatch(name: str, report: dict, atol: float, rtol: float) -> None:
    worst = max(
        (o for c in report["checks"] for o in c["outputs"] if "max_abs" in o),
        key=lambda o: o["max_abs"], default={"max_abs": float("nan"), "max_rel": float("nan")},
    )
    raise ExportError(
        f"the ONNX export of {name} disagrees with torch: max abs error {worst['max_abs']:.3g}, "
        f"max rel error {worst['max_rel']:.3g} (atol {atol:g}, rtol {rtol:g}); nothing was written"
    )


def _name_dynamic_axes(path: str, dynamic_axes: Sequence[Sequence[int]]) -> None:
    """Readable names for the graph's dynamic axes: ``batch`` for axis 0, ``sequence`` for axis 1,
    ``axis_N`` beyond (the exporter calls them ``s53``...), the same name wherever the axis recurs."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    rename: dict = {}
    for inp, axes in zip(model.graph.input, dynamic_axes):
        dims = inp.type.tensor_type.shape.dim
        for a in axes:
            if a < len(dims) and dims[a].dim_param and dims[a].dim_param not in rename:
                rename[dims[a].dim_param] = {0: "batch", 1: "sequence"}.get(a, f"axis_{a}")
    if len(set(rename.values())) != len(rename):  # two different axes would get one name: keep the exporter's
        return
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
    onnx.save(model, path)


def keyword_model(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """``model`` called positionally, its inputs passed on by keyword (``names``): a view that shares
    every tensor, whose parameter names are the model's own (refit names stay those of ``state_dict``)."""
    cls = type(model)
    names = list(names)

    def forward(self, *args):
        return cls.forward(self, **dict(zip(names, args)))

    import inspect

    forward.__signature__ = inspect.Signature(  # what torch.export binds its dynamic shapes to
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    view = copy.copy(model)
    view.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return view


def _prepare(model: nn.Module, fp16: bool) -> tuple[nn.Module, nn.Module]:
    """``(model to export, fp32 reference)``: merged copies; for fp16, weights and compute in fp16
    with fp32 inputs and outputs (casts at the graph's edges, by forward hooks: parameter names,
    and so TensorRT refit names, stay those of ``state_dict``)."""
    from torch.utils import _pytree as pytree

    model = copy.deepcopy(model).eval()
    if adapted_names(model):
        merge_(model, keep_base=False)
    if not fp16:
        return model, model
    half = copy.deepcopy(model).half()
    half.register_forward_pre_hook(lambda m, args: tuple(a.half() if torch.is_tensor(a) and a.is_floating_point() else a
                                                         for a in args))
    half.register_forward_hook(lambda m, args, out: pytree.tree_map(
        lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t, out))
    return half, model


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    path: str,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    fp16: bool = False,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    input_names: Optional[Sequence[str]] = None,
    external_data: Optional[bool] = None,
    optimize: bool = True,
    quantize: Optional[str] = None,
    calibration=None,
    before_publish=None,
    dynamic_axes: Optional[Sequence[Sequence[int]]] = None,
    by_name: bool = False,
) -> dict:
    """Export ``model`` to ONNX at ``path``, verify it in ONNX Runtime, keep it only if it matches.

    Args:
        model: a torch model; live Lie adapters are merged first (on a copy).
        example_inputs: a tensor or tuple of tensors with the export shapes.
        path: output ``.onnx`` path; the verification report is written to ``path + ".report.json"``.
        before_publish: ``(stage, staged_graph_path) -> dict`` called once the graph is checked, to
            write files that belong with it into the same staging folder (they are published in the
            same step, the graph last); what it returns is added to the report.
        opset: ONNX opset (default 18; TensorRT's parser accepts <= 20).
        dynamic_batch: make axis 0 of every input dynamic (checked at two batch sizes).
        fp16: weights and compute in float16, inputs and outputs in float32 (a strongly typed graph:
            what TensorRT 11 builds fp16 engines from); checked against the fp32 model with the fp16
            tolerance.
        atol, rtol: tolerances (defaults per dtype: fp32 1e-4/1e-3, fp16 2e-2/2e-2).
        input_names: graph input names (default ``input``, ``input_1``...).
        dynamic_axes: per input, the axes that stay dynamic in the graph (e.g. ``[(0, 1), (0, 1)]``
            for ``input_ids`` and ``attention_mask`` of any batch and length); overrides
            ``dynamic_batch``. Checked at the example shapes and at other sizes of those axes.
        by_name: pass the inputs to ``forward`` by keyword (``input_names``), as a transformers
            model takes ``input_ids=..., attention_mask=...``.

    The graph's outputs are named as the model's output says (a tensor: ``output``; a transformers
    output: its keys, e.g. ``logits``), as the server names them.
        external_data: store weights beside the graph; default: only past 2 GB.
        optimize: run the exporter's graph optimizer. ``False`` keeps every parameter as an
            initializer named as in ``state_dict()`` (what TensorRT refit needs).
        quantize: ``"int8"``: ONNX Runtime static quantization (QDQ, per-channel weights) of the
            checked fp32 graph, with ``calibration`` inputs (an array ``(N, ...)``); the int8 graph is
            checked against the fp32 one (tolerance in the report) and written at ``path``.

    Returns:
        The verification report (also saved as JSON).

    Raises:
        LieError: the exported graph disagrees with torch beyond tolerance (numbers in the message).
    """
    onnx = require_onnx("onnx")
    require_onnx("onnxruntime")
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    kind, atol, rtol = _check_options(opset, fp16, atol, rtol, quantize, calibration)
    prepared, reference = _prepare(model, fp16)
    names = list(input_names or [("input" if i == 0 else f"input_{i}") for i in range(len(example_inputs))])
    if by_name:
        prepared, reference = keyword_model(prepared, names), keyword_model(reference, names)
    n_bytes = sum(p.numel() * p.element_size() for p in prepared.state_dict().values())
    if external_data is None:
        external_data = n_bytes >= _TWO_GB
    check_export_inputs(prepared, example_inputs)
    with torch.no_grad():
        output_names = [n for n, _ in flatten_named(prepared(*example_inputs))]
    if dynamic_axes is None:
        dynamic_axes = [(0,) if dynamic_batch else () for _ in example_inputs]
    dynamic_axes = [tuple(int(a) for a in axes) for axes in dynamic_axes]
    with Staging(path) as stage:
        base = stage.name
        tmp_dir = stage.dir
        tmp_path = stage.path(base)
        dynamic_shapes = None
        if any(dynamic_axes):
            dims = {0: torch.export.Dim("batch", min=1, max=4096)}
            dynamic_shapes = tuple({a: dims.get(a, torch.export.Dim.DYNAMIC) for a in axes} for axes in dynamic_axes)
        _torch_export(prepared, example_inputs, tmp_path, opset=opset, names=names, dynamic_shapes=dynamic_shapes,
                      external_data=external_data, optimize=optimize, output_names=output_names)
        if any(dynamic_axes):
            _name_dynamic_axes(tmp_path, dynamic_axes)
        onnx.checker.check_model(tmp_path, full_check=False)
        other = {a: int(t.shape[a]) + 2 for t, axes in zip(example_inputs, dynamic_axes) for a in axes}
        batches = (None, other) if other else (None,)
        # fp16: checked against the fp32 model, within the fp16 tolerance
        report = verify_onnx(tmp_path, reference, example_inputs, batches=batches, atol=atol, rtol=rtol,
                             dynamic_axes=dynamic_axes)
        report.update(
            {"opset": int(opset), "dtype": kind, "io_dtype": "fp32", "dynamic_batch": any(0 in a for a in dynamic_axes),
             "inputs": names, "outputs": output_names, "dynamic_axes": {n: list(a) for n, a in zip(names, dynamic_axes)}, "external_data": bool(external_data),
             "optimized": bool(optimize),
             "onnx_bytes": sum(os.path.getsize(os.path.join(tmp_dir, f)) for f in os.listdir(tmp_dir))}
        )
        if not report["ok"]:
            _refuse_mismatch(base, report, atol, rtol)
        if quantize:
            from liedeploy.exporters.quantize import quantize_int8

            fp32_path = stage.path("fp32." + base)
            os.replace(tmp_path, fp32_path)
            report["int8"] = quantize_int8(fp32_path, tmp_path, calibration)
            os.unlink(fp32_path)
            report["dtype"] = "int8"
        if before_publish is not None:  # files that belong to the graph (a refit manifest): one publish
            report.update(before_publish(stage, tmp_path) or {})
        with open(os.path.join(tmp_dir, base + ".report.json"), "w") as f:
            json.dump(report, f, indent=2)
        stage.publish_all(last=base)
        return report
