"""The naive deployment a competent user writes (bench_serve.py's baseline): no batching, one merged
model per task, but tuned the way such a user tunes it.

- FastAPI on uvicorn, the same infer path and tensor encodings as liedeploy serve (binary tensors,
  and JSON parsed with orjson), so the same client drives both;
- a bounded pool of ``--workers`` inference threads, each running torch with ``--threads``
  intra-op threads (bench_serve sweeps workers x threads = cores and keeps the best);
- an LRU of merged per-task models held within ``--budget-bytes``: the models in the cache plus
  the skeletons in flight never exceed it (peak RSS is reported by the benchmark);
- single-flight loads: concurrent requests for a task that is not cached wait for one load;
- prebuilt model skeletons: a miss loads the task's merged safetensors file into an evicted (or
  prebuilt) model instead of building the architecture again.

    python benchmarks/naive_server.py --merged DIR --budget-bytes N [--workers 2 --threads 1] [--port P]
"""

import argparse
import concurrent.futures as cf
import os
import sys
import threading
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class MergedLRU:
    """Merged per-task models within a byte budget; single-flight loads into reused skeletons."""

    def __init__(self, folder: str, budget: int, make, workers: int):


        self.folder, self.make = folder, make
        probe = make()
        self.one = sum(t.numel() * t.element_size() for t in probe.state_dict().values())
        self.slots = max(1, budget // self.one - workers)  # room for a skeleton per worker in flight
        self.spare = [probe] + [make() for _ in range(workers - 1)]  # prebuilt skeletons
        self.cache: OrderedDict = OrderedDict()
        self.loading: dict = {}
        self.lock = threading.Lock()
        self.loads = 0

    def get(self, task: str):
        from safetensors.torch import load_file

        with self.lock:
            if task in self.cache:
                self.cache.move_to_end(task)
                return self.cache[task]
            pending = self.loading.get(task)
            if pending is None:
                pending = self.loading[task] = cf.Future()
                owner = True
                skeleton = self.spare.pop() if self.spare else None
            else:
                owner = False
        if not owner:
            return pending.result()
        try:
            m = skeleton if skeleton is not None else self.make()
            m.load_state_dict(load_file(os.path.join(self.folder, f"{task}.safetensors")))
            m.eval()
        except BaseException as exc:
            with self.lock:
                del self.loading[task]
                if skeleton is not None:
                    self.spare.append(skeleton)
            pending.set_exception(exc)
            raise
        with self.lock:
            self.loads += 1
            self.cache[task] = m
            del self.loading[task]
            while len(self.cache) > self.slots:
                _, old = self.cache.popitem(last=False)
                self.spare.append(old)  # a skeleton for the next miss: memory stays within the budget
        pending.set_result(m)
        return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--merged", required=True, help="folder of <task>.safetensors merged weights")
    ap.add_argument("--budget-bytes", type=int, required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="inference threads")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per inference thread")
    args = ap.parse_args()
    import numpy as np
    import orjson
    import torch
    from fastapi import FastAPI, Request, Response

    from benchmarks.serve_models import resnet18

    pool = cf.ThreadPoolExecutor(args.workers, initializer=lambda: torch.set_num_threads(args.threads))
    models = MergedLRU(args.merged, args.budget_bytes, resnet18, args.workers)
    app = FastAPI()

    @app.post("/v2/models/{task}/infer")
    async def infer(task: str, request: Request):
        import asyncio

        body = await request.body()
        hl = request.headers.get("inference-header-content-length")
        if hl is not None:
            head = orjson.loads(body[: int(hl)])
            shape = head["inputs"][0]["shape"]
            x = np.frombuffer(body[int(hl):], np.float32).reshape(shape)
        else:
            item = orjson.loads(body)["inputs"][0]
            x = np.asarray(item["data"], np.float32).reshape(item["shape"])

        def run():
            m = models.get(task)
            with torch.inference_mode():
                return m(torch.from_numpy(x.copy())).numpy()

        y = await asyncio.get_running_loop().run_in_executor(pool, run)
        if hl is None:
            return Response(orjson.dumps({"model_name": task, "outputs": [
                {"name": "output", "datatype": "FP32", "shape": list(y.shape), "data": y.reshape(-1).tolist()}]}),
                media_type="application/json")
        out_head = orjson.dumps({"model_name": task, "outputs": [{"name": "output", "datatype": "FP32",
                                                                  "shape": list(y.shape),
                                                                  "parameters": {"binary_data_size": y.nbytes}}]})
        return Response(out_head + y.tobytes(), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(out_head))})

    run_app(app, models, args.port)


def run_app(app, models: MergedLRU, port: int) -> None:
    """Add ``GET /loads`` (the benchmark reads the loads), then serve ``app`` on loopback at ``port``
    (0: a free one), printing the line the benchmark waits for."""
    import socket

    import uvicorn

    @app.get("/loads")
    def get_loads():
        return {"loads": models.loads}

    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    print(f"naive server listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


if __name__ == "__main__":
    main()
