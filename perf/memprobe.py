"""The child process of ``perf.engines.peak_memory``: load one engine, run it, print its peak RSS.

Reads ``{"entry": ..., "spec": ..., "texts": [...]}`` as JSON on stdin and prints
``[rss_after_imports_bytes, peak_rss_bytes]``.  The peak is the kernel's VmHWM, not
``ru_maxrss``: Linux carries ru_maxrss across fork+exec, so it would report the parent's peak.
"""

import json
import sys

import psutil

from perf.engines import EngineSpec, make_engine


def main() -> None:
    request = json.loads(sys.stdin.read())
    base = psutil.Process().memory_info().rss
    engine = make_engine(request["entry"], EngineSpec(**request["spec"]))
    texts = request["texts"]
    engine.predict_batch(texts[:32])
    for text in texts:
        engine.predict_one(text)
    with open("/proc/self/status") as status:
        hwm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    print(json.dumps([base, hwm_kib * 1024]))


if __name__ == "__main__":
    main()
