"""The naive deployment users write today (bench_serve.py's baseline (c)).

A plain FastAPI endpoint on uvicorn, no batching: an LRU of merged per-task models within a
memory budget; on a miss it builds the model and loads the task's merged safetensors file.
It speaks the same infer path and binary tensor encoding as liedeploy serve, so the same
client drives both.

    python benchmarks/naive_server.py --merged DIR --budget-bytes N --port P
"""


import argparse
import json
import os
import sys
import threading
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--merged", required=True, help="folder of <task>.safetensors merged weights")
    ap.add_argument("--budget-bytes", type=int, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np
    import torch
    import uvicorn
    from fastapi import FastAPI, Request, Response
    from safetensors.torch import load_file

    from benchmarks.serve_models import resnet18

    torch.set_num_threads(args.threads)
    app = FastAPI()
    cache: OrderedDict = OrderedDict()
    lock = threading.Lock()
    one = sum(p.numel() * 4 for p in resnet18().parameters())
    slots = max(1, args.budget_bytes // one)
    loads = [0]

    def model_for(task):
        with lock:
            if task in cache:
                cache.move_to_end(task)
                return cache[task]
        m = resnet18()
        m.load_state_dict(load_file(os.path.join(args.merged, f"{task}.safetensors")))
        m.eval()
        with lock:
            loads[0] += 1
            cache[task] = m
            while len(cache) > slots:
                cache.popitem(last=False)
        return m

    @app.post("/v2/models/{task}/infer")
    async def infer_raw(task: str, request: Request):
        body = await request.body()
        hl = int(request.headers["inference-header-content-length"])
        head = json.loads(body[:hl])
        shape = head["inputs"][0]["shape"]
        x = np.frombuffer(body[hl:], np.float32).reshape(shape)

        def run():
            m = model_for(task)
            with torch.inference_mode():
                return m(torch.from_numpy(x.copy())).numpy()

        import anyio

        y = await anyio.to_thread.run_sync(run)
        out_head = json.dumps({"model_name": task, "outputs": [{"name": "output", "datatype": "FP32",
                                                                 "shape": list(y.shape),
                                                                 "parameters": {"binary_data_size": y.nbytes}}]}).encode()
        return Response(out_head + y.tobytes(), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(out_head))})

    @app.get("/loads")
    def get_loads():
        return {"loads": loads[0]}

    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    print(f"naive server listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


if __name__ == "__main__":
    main()
