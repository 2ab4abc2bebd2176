"""The classifier itself: tokenize -> ONNX Runtime -> softmax.  Plain Python, no transport.

The BentoML service wraps it, export/ uses it to check and score every variant, and perf/
times it, so what is measured is exactly what is served.  It needs a variant directory's
``model.onnx`` and ``tokenizer.json``, and the labels, max length and pad id that the
variant's record (``variant.json``) owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.contract import MODEL_FILE, UserError, VariantRecord, read


@dataclass
class Encoded:
    """A padded batch as ONNX Runtime wants it, plus what the service reports about it.

    ``inputs`` maps each graph input name to an int64 array of shape [batch, tokens].
    """

    inputs: dict[str, np.ndarray]
    tokens: int  # real (non-padding) tokens in the batch
    truncated: int  # texts cut to max_length


def providers_for(device: str = "auto") -> list[str]:
    """ONNX Runtime providers: CUDA when asked for or (``auto``) when this onnxruntime build has it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxClassifier:
    """A variant's ONNX graph with its tokenizer.

    Args:
        directory: the variant directory (``model.onnx``, ``tokenizer.json``).
        labels: class names in logit order.
        max_length: tokens per text; longer texts are truncated (and counted).
        pad_token_id: the id padding a batch to its longest text.
        threads: ONNX Runtime intra-op threads (None: its default, one per core).
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
        spin: let ONNX Runtime's threads busy-wait between calls (its default).

    Raises UserError if the graph is not a loadable ONNX model.
    """

    def __init__(
        self,
        directory: str | Path,
        labels: list[str],
        max_length: int,
        pad_token_id: int = 0,
        threads: int | None = None,
        device: str = "auto",
        file_name: str = MODEL_FILE,
        spin: bool = True,
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        directory = Path(directory)
        self.labels = list(labels)
        self.max_length = int(max_length)
        # The Rust tokenizer directly: it reports truncation (``overflowing``) for free and
        # skips the Python wrapper's per-call overhead, which matters at batch 1.
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        # the family's own pad token: RoBERTa-style models number positions after it
        self.tokenizer.enable_padding(
            pad_id=pad_token_id, pad_token=self.tokenizer.id_to_token(pad_token_id) or "[PAD]"
        )
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
            raise UserError(
                f"{directory / file_name} is not a loadable ONNX model ({type(err).__name__}); re-export the variant"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.provider = self.session.get_providers()[0]

    @classmethod
    def load(cls, directory: str | Path, record: VariantRecord | None = None, **options) -> OnnxClassifier:
        """The classifier of a variant directory, configured from its record (read from ``variant.json``
        when not given).  ``options`` are the constructor's threads/device/spin."""
        record = record or read(directory, VariantRecord)
        return cls(directory, record.labels, record.max_length, record.pad_token_id, **options)

    def encode(self, texts: list[str]) -> Encoded:
        """Tokenize, truncate to ``max_length`` and pad to the longest text."""
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        arrays = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            arrays["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        return Encoded(
            inputs={name: arrays[name] for name in self.input_names},
            tokens=int(mask.sum()),
            truncated=sum(1 for e in encodings if e.overflowing),
        )

    def logits(self, encoded: Encoded) -> np.ndarray:
        """float32 logits of shape [batch, labels]."""
        return self.session.run(None, encoded.inputs)[0].astype(np.float32)

    def predict(self, texts: list[str]) -> list[dict]:
        """Label, its probability and every class probability for each text, in order."""
        return self.to_predictions(self.logits(self.encode(texts)))

    def to_predictions(self, logits: np.ndarray) -> list[dict]:
        probs = softmax(logits)
        best = probs.argmax(axis=1)
        return [
            {
                "label": self.labels[b],
                "score": float(p[b]),
                "probabilities": {name: float(x) for name, x in zip(self.labels, p, strict=True)},
            }
            for b, p in zip(best, probs, strict=True)
        ]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [batch, labels] logits."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def batched_logits(classifier: OnnxClassifier, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """float32 logits [len(texts), labels] in input order, computed in length-sorted batches (little padding)."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), len(classifier.labels)), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        out[idx] = classifier.logits(classifier.encode([texts[i] for i in idx]))
    return out
