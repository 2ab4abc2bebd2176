"""How close the int8 path gets to the CPU: work per sentence, and the int8 peak two ways.

* nominal: cores x 64 int8 multiply-accumulates per cycle (one AVX-512 VNNI VPDPBUSD per
  cycle) x clock, the figure the issue quotes; the clock is /proc/cpuinfo's "cpu MHz".
* measured: the best rate ONNX Runtime's own int8 GEMM (MatMulInteger, the kernel that
  dynamic quantization uses) reaches on a large square problem with the same threads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from export.machine import cpu_flags
from serve import families


def linear_macs_per_token(config_file: Path, pruning: dict | None) -> int:
    """Multiply-accumulates per token in the encoder's linear layers (the int8 MatMuls)."""
    config = json.loads(config_file.read_text())
    family = families.family(config["model_type"])
    dims = family.dims(config)
    hidden, layers, head_dim = dims["hidden"], dims["layers"], dims["head_size"]
    heads = pruning["heads_per_layer"] if pruning else [dims["heads"]] * layers
    ffn = pruning["ffn_per_layer"] if pruning else [dims["ffn"]] * layers
    ffn_projections = 3 if family.gated_ffn else 2  # a gated FFN has two input projections
    return sum(4 * hidden * h * head_dim + ffn_projections * hidden * f for h, f in zip(heads, ffn, strict=True))


def padded_tokens(variant_dir: Path, texts: list[str], batch: int, max_length: int, sort: bool) -> int:
    """Tokens the model really processes in Offline batches, padding included."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(variant_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(sorted(texts, key=len) if sort else texts)]
    return sum(len(chunk) * max(chunk) for chunk in (lengths[i : i + batch] for i in range(0, len(lengths), batch)))


def nominal_int8_peak(threads: int) -> dict:
    mhz = _cpu_mhz()
    per_cycle = 64 if "avx512_vnni" in cpu_flags() else 32
    return {
        "ops_per_s": threads * per_cycle * 2 * mhz * 1e6,
        "clock_mhz": mhz,
        "macs_per_cycle_per_core": per_cycle,
        "formula": f"{threads} cores x {per_cycle} int8 MACs/cycle x 2 ops x {mhz:.0f} MHz",
    }


def measured_int8_peak(threads: int, m: int = 512, k: int = 1024, n: int = 1024, repeats: int = 20) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 127, size=(k, n), dtype=np.int8), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "int8_peak",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 255, size=(m, k), dtype=np.uint8)
    for _ in range(3):
        session.run(None, {"A": a})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"A": a})
        best = min(best, time.perf_counter() - start)
    return {
        "ops_per_s": 2 * m * k * n / best,
        "shape": [m, k, n],
        "best_ms": round(best * 1e3, 3),
        "op": "MatMulInteger",
    }


def _cpu_mhz() -> float:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return float("nan")
