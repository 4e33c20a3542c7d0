"""int8 quantization with ONNX Runtime's static quantizer: QDQ graphs, per-channel weights.

The QDQ format (QuantizeLinear/DequantizeLinear pairs) is also what TensorRT 11 builds int8
engines from (strongly typed: precision lives in the graph). Activation ranges come from
calibration inputs (a ``.npy`` of real inputs); every quantized graph is checked in ONNX Runtime
against the fp32 model with the int8 tolerance stated in its report.
"""

from __future__ import annotations

import os

import numpy as np

from liedeploy.errors import ConfigError, ExportError

from liedeploy.exporters.onnx import require_onnx

__all__ = ["quantize_int8", "load_calibration", "INT8_TOLERANCE"]

# int8 check: max |int8 - fp32| <= INT8_TOLERANCE * max |fp32 output| (per output, over the calibration
# sample; a per-element bound: tiny nets such as the demo's reach 0.2), and top-1
# agreement reported for classifier-like outputs
INT8_TOLERANCE = 0.25


def load_calibration(path: str, example_shape: tuple) -> np.ndarray:
    """Calibration inputs from a ``.npy`` (never a pickle): ``(N, *example_shape[1:])`` float32.

    Only a regular file is opened (a FIFO or a device is refused at once); a ``.npz`` archive or a
    pickle is refused in one sentence naming the file.
    """

    from liedeploy.errors import LieError
    from liedeploy.io.safetensors_header import open_regular

    try:
        with open_regular(path) as f:
            if f.read(6) != b"\x93NUMPY":
                raise ConfigError(f"{path}: not a numpy .npy array (an .npz archive or another format; save one array "
                                  "with numpy.save)")
            f.seek(0)
            arr = np.load(f, allow_pickle=False)
    except ConfigError:
        raise
    except LieError as exc:
        raise ConfigError(f"calibration file: {exc}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"{path}: not a numpy .npy array ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if arr.ndim != len(example_shape) or tuple(arr.shape[1:]) != tuple(example_shape[1:]) or len(arr) < 1:
        raise ConfigError(f"{path}: calibration inputs have shape {list(arr.shape)}; the model takes "
                          f"[N, {', '.join(map(str, example_shape[1:]))}]")
    if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
        raise ConfigError(f"{path}: calibration inputs must be finite floating-point values")
    return arr.astype(np.float32)


def quantize_int8(fp32_path: str, out_path: str, calibration: np.ndarray, *, batch: int = 8,
                  tolerance: float = INT8_TOLERANCE) -> dict:
    """Write the int8 QDQ model of ``fp32_path`` at ``out_path`` and check it against the fp32 graph."""
    ort = require_onnx("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    sess = ort.InferenceSession(fp32_path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    dims = sess.get_inputs()[0].shape
    fixed_batch = dims[0] if isinstance(dims[0], int) else None
    step = fixed_batch or batch

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calibration):
                return None
            chunk = calibration[self.i: self.i + step]
            self.i += step
            if fixed_batch and len(chunk) != fixed_batch:
                return None
            return {name: chunk}

        def rewind(self):
            self.i = 0

    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT's quantizer warns on the root logger once per tensor (advice, not faults)
    try:
        quantize_static(fp32_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    q = ort.InferenceSession(out_path, providers=["CPUExecutionProvider"])
    xs = calibration[: max(step, min(len(calibration), 64))]
    if fixed_batch:
        xs = xs[:fixed_batch]
    ref = sess.run(None, {name: xs})
    got = q.run(None, {name: xs})
    checks, ok = [], True
    for r, g in zip(ref, got):
        scale = float(np.abs(r).max()) or 1.0
        err = float(np.abs(g.astype(np.float32) - r).max())
        item = {"max_abs": err, "max_abs_over_range": err / scale, "ok": err <= tolerance * scale}
        if r.ndim == 2 and r.shape[1] > 1:
            item["top1_agreement"] = float((r.argmax(-1) == g.argmax(-1)).mean())
        checks.append(item)
        ok &= item["ok"]
    report = {"ok": bool(ok), "format": "QDQ", "per_channel": True, "tolerance": f"max |int8 - fp32| <= {tolerance} x max |fp32|",
              "checks": checks, "calibration_samples": int(len(calibration)),
              "fp32_bytes": _size(fp32_path), "int8_bytes": _size(out_path)}
    if not ok:
        worst = max(c["max_abs_over_range"] for c in checks)
        raise ExportError(f"the int8 model disagrees with fp32 by {worst:.3g} of the output range (tolerance {tolerance}); "
                          "nothing was written: give more representative --calibration inputs")
    return report


def _size(path: str) -> int:
    folder = os.path.dirname(os.path.abspath(path))
    total = os.path.getsize(path)
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
        locs = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        total += sum(os.path.getsize(os.path.join(folder, loc)) for loc in locs if os.path.exists(os.path.join(folder, loc)))
    except Exception:  # noqa: BLE001 - size of the graph file alone
        pass
    return total
