"""The classifier itself: tokenize -> ONNX Runtime -> softmax.  Plain Python, no transport.

The BentoML service wraps it, export/ uses it to validate and score every variant, and
perf/ times it, so what is measured is exactly what is served.  It needs only a variant
directory: ``model.onnx``, the tokenizer files and ``config.json`` (labels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.errors import UserError

MODEL_FILE = "model.onnx"


@dataclass
class Encoded:
    """A padded batch as ONNX Runtime wants it, plus what the service reports about it."""

    inputs: dict[str, np.ndarray]
    tokens: int  # real (non-padding) tokens in the batch
    truncated: int  # texts cut to max_length


def providers_for(device: str = "auto") -> list[str]:
    """CUDA when asked for or (``auto``) when this onnxruntime build and machine have it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxClassifier:
    def __init__(self, directory: str | Path, threads: int | None = None, device: str = "auto",
                 file_name: str = MODEL_FILE, max_length: int | None = None, spin: bool = True):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        self.labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        tok_config = json.loads((directory / "tokenizer_config.json").read_text())
        self.max_length = int(max_length or min(tok_config.get("model_max_length", 512), 512))
        # The Rust tokenizer directly: it reports truncation (``overflowing``) for free and
        # skips the Python wrapper's per-call overhead, which matters at batch 1.
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(pad_id=config.get("pad_token_id", 0) or 0)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spin:
            # ORT's workers busy-wait after each call; between sparse requests that burns a core
            # (seen here: ~45 ms of CPU per 50 ms gap) that HTTP parsing and tokenizing need.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(directory / file_name), options, providers=providers_for(device))
        except Exception as err:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail...)
            raise UserError(f"{directory / file_name} is not a loadable ONNX model ({type(err).__name__}); "
                            "re-export the variant") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.provider = self.session.get_providers()[0]

    def encode(self, texts: list[str]) -> Encoded:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        arrays = {"input_ids": ids, "attention_mask": mask,
                  "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
        return Encoded(inputs={name: arrays[name] for name in self.input_names}, tokens=int(mask.sum()),
                       truncated=sum(1 for e in encodings if e.overflowing))

    def logits(self, encoded: Encoded) -> np.ndarray:
        return self.session.run(None, encoded.inputs)[0].astype(np.float32)

    def predict(self, texts: list[str]) -> list[dict]:
        """Label, its probability and every class probability for each text."""
        return self.to_predictions(self.logits(self.encode(texts)))

    def to_predictions(self, logits: np.ndarray) -> list[dict]:
        probs = softmax(logits)
        best = probs.argmax(axis=1)
        return [{"label": self.labels[b], "score": float(p[b]),
                 "probabilities": {name: float(x) for name, x in zip(self.labels, p)}}
                for b, p in zip(best, probs)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def batched_logits(classifier: OnnxClassifier, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Logits for many texts, in length-sorted batches (little padding), in input order."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), len(classifier.labels)), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        out[idx] = classifier.logits(classifier.encode([texts[i] for i in idx]))
    return out
