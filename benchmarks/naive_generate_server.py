"""The naive text-generation deployment a competent user writes (bench_generate.py's baseline (a)):
one merged model per task, each request generating alone with transformers' ``generate()``.

Tuned the way such a user tunes it:
- a bounded pool of ``--workers`` generation threads, each with ``--threads`` torch intra-op
  threads (bench_generate sweeps workers x threads = cores and keeps the best);
- an LRU of merged per-task models within ``--budget-bytes`` (the same budget liedeploy gets),
  single-flight loads, prebuilt model skeletons reused on a miss (``naive_server.MergedLRU``);
- streaming with transformers' ``TextIteratorStreamer``, in the OpenAI completion-chunk format,
  so the same client drives both servers.

    python benchmarks/naive_generate_server.py --model DIR --merged DIR --budget-bytes N [--workers 2 --threads 1]
"""

import argparse
import concurrent.futures as cf
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.naive_server import MergedLRU, run_app  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the transformers folder (config and tokenizer)")
    ap.add_argument("--merged", required=True, help="folder of <task>.safetensors merged weights")
    ap.add_argument("--budget-bytes", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    import asyncio

    import torch
    from fastapi import FastAPI, Request
    from starlette.responses import StreamingResponse
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    config = AutoConfig.from_pretrained(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)

    def make():
        return AutoModelForCausalLM.from_config(config).eval()

    pool = cf.ThreadPoolExecutor(args.workers, initializer=lambda: torch.set_num_threads(args.threads))
    models = MergedLRU(args.merged, args.budget_bytes, make, args.workers)
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = json.loads(await request.body())
        task, n = body["model"], int(body.get("max_tokens", 16))
        ids = tok(body["prompt"], return_tensors="pt")
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)

        def run():
            m = models.get(task)
            with torch.inference_mode():
                m.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, streamer=streamer)

        job = asyncio.get_running_loop().run_in_executor(pool, run)

        async def events():
            while True:
                chunk = await asyncio.to_thread(next, streamer, None)
                if chunk is None:
                    break
                if chunk:
                    yield ("data: " + json.dumps({"object": "text_completion", "choices": [
                        {"index": 0, "text": chunk, "finish_reason": None}]}) + "\n\n").encode()
            await job
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    run_app(app, models, args.port)


if __name__ == "__main__":
    main()
