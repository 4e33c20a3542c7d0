"""Open Inference Protocol v2 infer requests and responses, JSON and Triton's binary tensor extension.

Decoding checks everything against the task's input specs (names, datatypes, shapes, sizes, and
the range of integer ids the model declares), so the batcher only ever sees well-formed numpy
arrays; every refusal is a :class:`~liedeploy.serving.errors.BadRequest` with one sentence. JSON is
parsed with orjson when it is installed (the ``serve`` extra installs it), else the standard
library; the app runs large bodies through this module off the event loop.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from liedeploy.serving.errors import BadRequest
from liedeploy.serving.specs import DATATYPES, NUMPY_TO_DATATYPE, TensorSpec

__all__ = ["InferRequest", "decode_infer_request", "precheck_infer_json", "encode_infer_response", "HEADER_LENGTH", "json_loads", "json_dumps",
           "json_response"]

HEADER_LENGTH = "Inference-Header-Content-Length"

try:  # a maintained fast parser, where installed
    import orjson as _orjson
except ImportError:  # pragma: no cover - the serve extra installs it
    _orjson = None


def json_loads(data):
    """Parse JSON (orjson where installed); ValueError on malformed input."""
    if _orjson is not None:
        return _orjson.loads(data)
    return json.loads(data)


def json_response(status: int, payload, headers=None):
    """A Starlette JSON response of ``payload`` (serialised with :func:`json_dumps`)."""
    from starlette.responses import Response

    return Response(json_dumps(payload), status_code=status, media_type="application/json", headers=headers)


def json_dumps(obj) -> bytes:
    """Compact JSON bytes (orjson where installed)."""
    if _orjson is not None:
        return _orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class InferRequest:
    id: Optional[str]
    inputs: dict  # name -> np.ndarray (batch first)
    batch: int
    outputs: Optional[list] = None  # requested output names, or None for all
    binary: dict = field(default_factory=dict)  # output name -> bool (binary_data)
    binary_default: bool = False


def _bad(msg: str) -> BadRequest:
    return BadRequest(msg)


def _shape(raw, name: str) -> tuple:
    if not isinstance(raw, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw):
        raise _bad(f"input {name!r} has shape {raw!r}: a shape is a list of non-negative integers")
    return tuple(raw)


_WS = " \t\n\r"


def precheck_infer_json(body: bytes, specs: Sequence[TensorSpec], prefix: int = 64 << 10) -> None:
    """Refuse a large JSON infer request from its first ``prefix`` bytes, before parsing its data.

    Reads, with the JSON decoder, the fields that come before each input's ``data`` (as
    tritonclient and most clients write them): an unknown input, a wrong datatype, a shape the
    model does not take, or a shape whose values cannot fit in the body's bytes (a JSON number
    takes at least two bytes with its comma) is refused with the same sentence the full decoder
    would give. Anything it cannot read in the prefix is left to :func:`decode_infer_request`.
    """
    text = body[:prefix].decode("utf-8", errors="ignore")
    dec = json.JSONDecoder()
    by_name = {s.name: s for s in specs}

    def skip(i):
        while i < len(text) and text[i] in _WS:
            i += 1
        return i

    def obj_items(i):
        """Yield ``(key, value start index)`` of the object starting at ``i``; the caller consumes values."""
        i = skip(i)
        if i >= len(text) or text[i] != "{":
            return
        i += 1
        while True:
            i = skip(i)
            if i >= len(text) or text[i] == "}":
                return
            if text[i] == ",":
                i = skip(i + 1)
            try:
                key, i = dec.raw_decode(text, i)
            except ValueError:
                return
            i = skip(i)
            if i >= len(text) or text[i] != ":" or not isinstance(key, str):
                return
            i = yield key, skip(i + 1)
            if i is None:
                return

    try:
        top = obj_items(0)
        item = next(top)
        while item is not None:
            key, at = item
            if key != "inputs":
                _, end = dec.raw_decode(text, at)
                item = top.send(end)
                continue
            if text[at: at + 1] != "[":
                return
            j = at + 1
            while True:
                j = skip(j)
                if text[j: j + 1] == ",":
                    j = skip(j + 1)
                if text[j: j + 1] != "{":
                    return
                fields, inner = {}, obj_items(j)
                field = next(inner)
                while field is not None:
                    fkey, fat = field
                    if fkey == "data":
                        _check_head(fields, by_name, len(body))
                        return  # the values themselves are the full decoder's job
                    value, fend = dec.raw_decode(text, fat)
                    fields[fkey] = value
                    field = inner.send(fend)
                return
    except BadRequest:
        raise
    except (StopIteration, ValueError, IndexError):  # not the usual layout: the full decoder decides
        return


def _check_head(fields: dict, by_name: dict, body_bytes: int) -> None:
    name, dt, shape = fields.get("name"), fields.get("datatype"), fields.get("shape")
    if not isinstance(name, str):
        return
    spec = by_name.get(name)
    if spec is None:
        raise _bad(f"unknown input {name!r}; this model takes {', '.join(by_name)}")
    if dt is None:  # the full decoder checks the datatype first: without it, leave the rest to it
        return
    if dt != spec.datatype:
        raise _bad(f"input {name!r} has datatype {dt!r}, the model takes {spec.datatype}")
    if shape is None or (fields.get("parameters") or {}).get("binary_data_size") is not None:
        return
    shape = _shape(shape, name)
    if len(shape) != len(spec.shape) or any(w != -1 and g != w for g, w in zip(shape, spec.shape)):
        raise _bad(f"input {name!r} has shape {list(shape)}, the model takes {list(spec.shape)} (-1: any size)")
    count = math.prod(shape)
    if 2 * count - 1 > body_bytes:
        raise _bad(f"input {name!r} holds fewer values than its shape {list(shape)} needs ({count})")


def decode_infer_request(body: bytes, header_length: Optional[str], specs: Sequence[TensorSpec]) -> InferRequest:
    """Parse an infer request body (JSON, or JSON + binary tensors) into checked numpy inputs."""
    req, rest = _split_body(body, header_length)
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("the request needs a non-empty 'inputs' list")
    by_name = {s.name: s for s in specs}
    inputs, offset, batch = {}, 0, None
    for item in raw_inputs:
        name, arr, offset = _decode_input(item, by_name, rest, offset)
        if name in inputs:
            raise _bad(f"input {name!r} is given twice")
        if batch is not None and arr.shape[0] != batch:
            raise _bad(f"inputs disagree on the batch size ({batch} and {arr.shape[0]})")
        batch = arr.shape[0]
        inputs[name] = arr
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise _bad(f"input {missing[0]!r} is missing")
    if offset != len(rest):
        raise _bad(f"the body holds {len(rest) - offset} bytes of binary data that no input claims")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("the request 'parameters' must be an object")
    outs, binary = _requested_outputs(req, params)
    rid = req.get("id")
    return InferRequest(id=str(rid) if rid is not None else None, inputs=inputs, batch=int(batch), outputs=outs,
                        binary=binary, binary_default=bool(params.get("binary_data_output", False)))


def _split_body(body: bytes, header_length: Optional[str]) -> tuple[dict, memoryview]:
    """``(request JSON object, binary part)`` of a body (Triton's binary extension splits them)."""
    if header_length is not None:
        try:
            n = int(header_length)
            if not 0 <= n <= len(body):
                raise ValueError
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} {header_length!r} is not a length within the body of {len(body)} bytes") from None
        head, rest = body[:n], memoryview(body)[n:]
    else:
        head, rest = body, memoryview(b"")
    try:
        req = json_loads(bytes(head) if isinstance(head, memoryview) else head)
    except RecursionError:
        raise _bad("the request JSON nests too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise _bad("the request body is not valid JSON") from None
    if not isinstance(req, dict):
        raise _bad("the request must be a JSON object with 'inputs'")
    return req, rest


def _decode_input(item, by_name: dict, rest: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    """``(name, array, new binary offset)`` of one input entry, checked against its spec."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise _bad("each input must be an object with a 'name', 'datatype', 'shape' and 'data'")
    name = item["name"]
    spec = by_name.get(name)
    if spec is None:
        raise _bad(f"unknown input {name!r}; this model takes {', '.join(by_name)}")
    dt = item.get("datatype")
    if dt != spec.datatype:
        raise _bad(f"input {name!r} has datatype {dt!r}, the model takes {spec.datatype}")
    shape = _shape(item.get("shape"), name)
    if len(shape) != len(spec.shape) or any(w != -1 and g != w for g, w in zip(shape, spec.shape)):
        raise _bad(f"input {name!r} has shape {list(shape)}, the model takes {list(spec.shape)} (-1: any size)")
    if not shape or shape[0] < 1:
        raise _bad(f"input {name!r} has an empty batch")
    dtype = np.dtype(DATATYPES[dt])
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f"input {name!r} has 'parameters' that are not an object")
    if params.get("binary_data_size") is not None:
        arr, offset = _binary_values(name, params["binary_data_size"], shape, dt, dtype, rest, offset)
    else:
        arr = _json_values(name, item.get("data"), shape, dt, dtype)
    _check_bounds(name, arr, spec)
    return name, arr.reshape(shape), offset


def _binary_values(name, size, shape, dt, dtype, rest: memoryview, offset: int) -> tuple[np.ndarray, int]:
    count = math.prod(shape)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(f"input {name!r} has binary_data_size {size!r}, not a byte count")
    if size != count * dtype.itemsize:
        raise _bad(f"input {name!r} has {size} bytes of binary data, its shape {list(shape)} of {dt} needs "
                   f"{count * dtype.itemsize}")
    if offset + size > len(rest):
        raise _bad(f"input {name!r} needs {size} bytes of binary data, the body holds {len(rest) - offset}")
    arr = np.frombuffer(rest[offset: offset + size], dtype=dtype.newbyteorder("<")).astype(dtype, copy=True)
    return arr, offset + size


def _json_values(name, data, shape, dt, dtype) -> np.ndarray:
    count = math.prod(shape)
    if data is None:
        raise _bad(f"input {name!r} has neither 'data' nor binary data")
    try:
        arr = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise _bad(f"input {name!r}: its data are not {dt} values") from None
    if arr.dtype == np.object_ or arr.size != count:
        raise _bad(f"input {name!r} holds {arr.size} values, its shape {list(shape)} needs {count}")
    if dtype.kind == "f" and isinstance(data, list) and _has_bool(data):
        raise _bad(f"input {name!r}: its data are not {dt} values")
    return arr


def _check_bounds(name: str, arr: np.ndarray, spec: TensorSpec) -> None:
    if spec.bounds is not None and arr.size:
        lo, hi = spec.bounds
        bad = arr[(arr < lo) | (arr >= hi)]
        if bad.size:
            raise _bad(f"input {name!r} holds {int(bad.flat[0])}, outside [{lo}, {hi}) (what the model's "
                       "embedding takes)")


def _requested_outputs(req: dict, params: dict) -> tuple[Optional[list], dict]:
    """``(output names asked for or None for all, {name: binary?})``."""
    if req.get("outputs") is None:
        return None, {}
    if not isinstance(req["outputs"], list):
        raise _bad("'outputs' must be a list of objects with a 'name'")
    outs, binary = [], {}
    for o in req["outputs"]:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise _bad("'outputs' must be a list of objects with a 'name'")
        outs.append(o["name"])
        p = o.get("parameters") or {}
        binary[o["name"]] = bool(p.get("binary_data", params.get("binary_data_output", False))) if isinstance(p, dict) else False
    return outs, binary


def _has_bool(data) -> bool:
    stack = [data]
    while stack:
        v = stack.pop()
        if isinstance(v, bool):
            return True
        if isinstance(v, list):
            stack.extend(v[:64])  # a sample is enough to tell JSON booleans from numbers
    return False


def encode_infer_response(model: str, request: InferRequest, outputs: dict) -> tuple[bytes, dict]:
    """``(body, headers)`` of an infer response; binary outputs follow the JSON header."""
    names = request.outputs if request.outputs is not None else list(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise _bad(f"unknown output {unknown[0]!r}; this model returns {', '.join(outputs)}")
    items, blobs = [], []
    for n in names:
        arr = np.ascontiguousarray(outputs[n])
        dt = NUMPY_TO_DATATYPE.get(arr.dtype)
        if dt is None:
            arr = arr.astype(np.float32)
            dt = "FP32"
        entry = {"name": n, "datatype": dt, "shape": list(arr.shape)}
        if request.binary.get(n, request.binary_default):
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        items.append(entry)
    resp = {"model_name": model, "model_version": "1", "outputs": items}
    if request.id is not None:
        resp["id"] = request.id
    head = json_dumps(resp)
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH.lower(): str(len(head))}
