"""Longer fuzz run of the header and metadata parser than the suite's (same property, same strategies).

    python benchmarks/fuzz_header.py --examples 20000

Property: any byte string is read correctly or refused with AdapterFileError (one sentence naming
the file), never another exception and never a hang (each example runs under an alarm).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis import given, settings  # noqa: E402

from tests.fuzz_strategies import safetensors_bytes  # noqa: E402
from tests.test_fuzz_header import check_one  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=20000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "f.safetensors")
    count = [0]

    def alarm(*_):
        raise TimeoutError("an example took more than 5 s: a hang")

    signal.signal(signal.SIGALRM, alarm)

    @settings(max_examples=args.examples, deadline=None, database=None)
    @given(data=safetensors_bytes())
    def run(data):
        signal.alarm(5)
        try:
            check_one(path, data)
        finally:
            signal.alarm(0)
        count[0] += 1

    t = time.perf_counter()
    run()
    print(f"{count[0]} examples, every one read or refused with AdapterFileError, in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
