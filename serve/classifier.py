"""The classifier itself: tokenize -> ONNX Runtime -> softmax.  Plain Python, no transport.

The BentoML service wraps it, export/ uses it to check and score every variant, and perf/
times it, so what is measured is exactly what is served.  It needs a variant directory's
``model.onnx`` and ``tokenizer.json``, and the labels, max length and pad id that the
variant's record (``variant.json``) owns.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
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


def providers_for(device: str = "auto", device_id: int = 0) -> list:
    """ONNX Runtime providers: CUDA (on GPU ``device_id``) when asked for or (``auto``) when this onnxruntime has it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available):
        _preload_cuda_libraries()
        # use_tf32 0: an fp32 variant promises fp32 results (export/ checks it against PyTorch within 1e-3), and
        # ONNX Runtime's default TF32 would round every matmul input to 10 bits; onnx-fp16 is the fast GPU variant.
        return [("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@functools.cache
def _preload_cuda_libraries() -> None:
    # onnxruntime-gpu from PyPI finds CUDA and cuDNN in the nvidia-* wheels (its [cuda,cudnn] extras, or torch's)
    # only once they are loaded; a system CUDA or LD_LIBRARY_PATH needs none of this. Missing ones are printed.
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


# Run in a child process by probe_provider: the model on one provider, and which provider ONNX Runtime used.
_PROBE = """
import sys
import onnxruntime as ort
if sys.argv[2] == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
session = ort.InferenceSession(sys.argv[1], providers=[sys.argv[2]])
print("provider=" + session.get_providers()[0])
"""


def probe_provider(model: str | Path, provider: str, timeout_s: float = 120) -> str | None:
    """Why ONNX Runtime cannot run ``model`` on ``provider`` here (one line), or None when it can.

    In a child process: a CUDA session's context (hundreds of MB of GPU memory) stays for the
    life of its process, and the server's arbiter, which checks before any worker starts,
    should not hold one.  ONNX Runtime falls back to CPU with a logged warning when a provider
    does not start; the reason given is its last error or warning line.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(model), provider], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"creating a {provider} session took over {timeout_s:.0f} s"
    used = re.findall(r"^provider=(\S+)$", proc.stdout, re.M)
    if proc.returncode == 0 and used and used[-1] == provider:
        return None
    # messages only: not the indented source lines a Python warning or traceback quotes
    output = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip() and not line[0].isspace()]
    complaints = [line for line in output if re.search(r"error|fail|warn|cannot|not ", line, re.I)]
    reason = (complaints or output or ["no output"])[-1]
    reason = re.sub(r"^\S+\.py:\d+: ", "", reason.split("] ")[-1].strip())[:300]  # ORT's or Python's prefix
    return f"the session ran on {used[-1]}: {reason}" if used else f"no session ({reason})"


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
        device_id: the GPU (CUDA device id) when on CUDA.

    Raises UserError if the graph is not a loadable ONNX model, or if ``device`` is ``cuda``
    and ONNX Runtime runs it on another provider (it falls back to CPU by itself otherwise).
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
        device_id: int = 0,
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        directory = Path(directory)
        self.labels = list(labels)
        self.max_length = int(max_length)
        self.pad_token_id = pad_token_id
        # The Rust tokenizer directly: it reports truncation (``overflowing``) for free and
        # skips the Python wrapper's per-call overhead, which matters at batch 1.  Padding is
        # ours (``pad``), so that texts tokenized one request at a time can share a batch.
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spin:
            # ORT's workers busy-wait after each call; between sparse requests that burns a core
            # (seen here: ~45 ms of CPU per 50 ms gap) that HTTP parsing and tokenizing need.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(directory / file_name), options, providers=providers_for(device, device_id)
            )
        except Exception as err:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail...)
            raise UserError(
                f"{directory / file_name} is not a loadable ONNX model ({type(err).__name__}); re-export the variant"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.provider = self.session.get_providers()[0]
        self.device_id = device_id if self.provider == "CUDAExecutionProvider" else None
        if device == "cuda":
            if self.provider != "CUDAExecutionProvider":
                raise UserError(
                    f"device cuda was asked for, but ONNX Runtime runs {directory / file_name} on {self.provider}: "
                    "its CUDA provider did not start (its error is logged above)"
                )
            self.session.disable_fallback()  # a CUDA failure at run time raises instead of moving to CPU

    @property
    def placement(self) -> str:
        """Where the model runs, for logs: ``CUDAExecutionProvider (GPU 0)`` or ``CPUExecutionProvider``."""
        return self.provider if self.device_id is None else f"{self.provider} (GPU {self.device_id})"

    @classmethod
    def load(cls, directory: str | Path, record: VariantRecord | None = None, **options) -> OnnxClassifier:
        """The classifier of a variant directory, configured from its record (read from ``variant.json``
        when not given).  ``options`` are the constructor's threads/device/spin."""
        record = record or read(directory, VariantRecord)
        return cls(directory, record.labels, record.max_length, record.pad_token_id, **options)

    def tokenize(self, texts: list[str]) -> list:
        """One ``tokenizers.Encoding`` per text: truncated to ``max_length``, not padded."""
        if len(texts) == 1:  # the batch machinery costs more than the text at batch 1
            return [self.tokenizer.encode(texts[0])]
        return self.tokenizer.encode_batch(texts)

    def pad(self, encodings: list) -> Encoded:
        """int64 arrays [texts, longest] for the graph's inputs, padded with ``pad_token_id``."""
        longest = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), longest), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), longest), dtype=np.int64)
        types = np.zeros((len(encodings), longest), dtype=np.int64) if "token_type_ids" in self.input_names else None
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = e.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return Encoded(
            inputs={name: arrays[name] for name in self.input_names},
            tokens=int(mask.sum()),
            truncated=sum(1 for e in encodings if e.overflowing),
        )

    def encode(self, texts: list[str]) -> Encoded:
        """Tokenize, truncate to ``max_length`` and pad to the longest text."""
        return self.pad(self.tokenize(texts))

    def logits(self, encoded: Encoded) -> np.ndarray:
        """float32 logits of shape [batch, labels]."""
        return self.session.run(None, encoded.inputs)[0].astype(np.float32)

    def predict(self, texts: list[str]) -> list[dict]:
        """Label, its probability and every class probability for each text, in order."""
        return self.to_predictions(self.logits(self.encode(texts)))

    def to_predictions(self, logits: np.ndarray) -> list[dict]:
        return self.describe(softmax(logits))

    def describe(self, probs: np.ndarray) -> list[dict]:
        """``{"label", "score", "probabilities"}`` per row of float probabilities [texts, labels]."""
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


def content_tokens(encoding) -> int:
    """Tokens of a text besides the special ones ([CLS], [SEP], <s>...): 0 when the normalizer erased it all."""
    return len(encoding.ids) - sum(encoding.special_tokens_mask)
