"""Serving many tasks over the network (extra ``serve``): the Open Inference Protocol v2 over HTTP.

- :mod:`.specs`, :mod:`.protocol`: tensor specs, JSON and binary tensor encodings;
- :mod:`.backend`: the backend protocol and registry; :mod:`.backends`: the torch, ONNX Runtime
  and TensorRT backends, one module each;
- :mod:`.batcher`: dynamic batching with a fold-aware scheduler;
- :mod:`.app`, :mod:`.metrics`, :mod:`.server`: the HTTP app, Prometheus metrics, uvicorn;
- :mod:`.ray`: the same app as a Ray Serve application.

Like ``cli/``, this is a top layer: its stack (starlette, uvicorn, prometheus_client, ray) is
imported where used.
"""

__all__ = ["specs", "protocol", "backend", "batcher", "app", "metrics", "server"]
