"""The things perf/ times, behind one small interface.

* ``PipelineEngine``: transformers ``pipeline("text-classification")`` on the PyTorch fp32
  model, eager: what most users start with (baseline a).
* ``OnnxEngine``: serve/'s own ``OnnxClassifier`` (tokenize -> ONNX Runtime -> softmax) on a
  variant directory, so the timed path is the served path (variants and baseline b).

Each engine can classify one text, classify a batch, and run the bare model on a synthetic
batch of an exact shape (for the shape sweep, tokenization excluded).  ``peak_memory`` loads
one in a fresh process (perf/memprobe.py) to measure what it alone takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from serve.classifier import Encoded, OnnxClassifier, batched_logits


@dataclass(frozen=True)
class EngineSpec:
    """How every engine runs: threads, ONNX Runtime spinning, and the tokenization of the served variants."""

    threads: int
    spin: bool
    labels: list[str]
    max_length: int
    pad_token_id: int


class OnnxEngine:
    def __init__(self, name: str, directory: Path, spec: EngineSpec):
        self.name = name
        self.clf = OnnxClassifier(
            directory,
            spec.labels,
            spec.max_length,
            spec.pad_token_id,
            threads=spec.threads,
            device="cpu",
            spin=spec.spin,
        )

    def predict_one(self, text: str) -> None:
        self.clf.predict([text])

    def predict_batch(self, texts: list[str]) -> None:
        self.clf.predict(texts)

    def forward_shape(self, ids: np.ndarray) -> None:
        """The bare model on int64 token ids [batch, tokens], tokenization excluded."""
        mask = np.ones_like(ids)
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        self.clf.logits(Encoded({n: arrays[n] for n in self.clf.input_names}, int(mask.sum()), 0))

    def logits(self, texts: list[str]) -> np.ndarray:
        return batched_logits(self.clf, texts, 64)


class PipelineEngine:
    def __init__(self, name: str, model_dir: Path, spec: EngineSpec):
        import torch
        from transformers import pipeline

        torch.set_num_threads(spec.threads)
        self.name = name
        self.torch = torch
        self.max_length = spec.max_length
        self.pipe = pipeline(
            "text-classification",
            model=str(model_dir),
            device=-1,
            top_k=None,
            truncation=True,
            max_length=spec.max_length,
        )
        self.model = self.pipe.model.eval()

    def predict_one(self, text: str) -> None:
        self.pipe(text)

    def predict_batch(self, texts: list[str]) -> None:
        self.pipe(texts, batch_size=len(texts))

    def forward_shape(self, ids: np.ndarray) -> None:
        with self.torch.inference_mode():
            t = self.torch.from_numpy(ids)
            self.model(input_ids=t, attention_mask=self.torch.ones_like(t))

    def logits(self, texts: list[str]) -> np.ndarray:
        tokenizer = self.pipe.tokenizer
        out = []
        with self.torch.inference_mode():
            for start in range(0, len(texts), 64):
                batch = tokenizer(
                    texts[start : start + 64],
                    truncation=True,
                    padding=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                out.append(self.model(**batch).logits.float().numpy())
        return np.concatenate(out)


class SyntheticTokens:
    """Random token ids of exact shapes for the shape sweep, in the served tokenizer's own vocabulary.

    Each row is framed by the ids the tokenizer itself puts around a text (BERT's [CLS] ... [SEP]
    are 101/102, RoBERTa's <s> ... </s> 0/2, ModernBERT's 50281/50282), and filled with ordinary
    (non-special) tokens, so every family's embedding lookup sees ids it really has.
    """

    def __init__(self, tokenizer_file: Path):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        framing = tokenizer.encode("").ids  # the post-processor's specials around an empty text
        self.first = framing[0] if framing else None
        self.last = framing[-1] if len(framing) > 1 else None
        special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        self.ordinary = np.array(sorted(set(tokenizer.get_vocab().values()) - special), dtype=np.int64)

    def __call__(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        """int64 ids [batch, length]."""
        ids = self.ordinary[rng.integers(0, len(self.ordinary), size=(batch, length))]
        if self.first is not None:
            ids[:, 0] = self.first
        if self.last is not None:
            ids[:, -1] = self.last
        return ids


def make_engine(entry: dict, spec: EngineSpec):
    """The engine of a report entry (``name``, ``kind``, ``path``): the pipeline for the PyTorch baseline, else ONNX."""
    if entry["kind"] == "baseline" and entry["name"] == "baseline-pipeline":
        return PipelineEngine(entry["name"], Path(entry["path"]), spec)
    return OnnxEngine(entry["name"], Path(entry["path"]), spec)


def peak_memory(entry: dict, spec: EngineSpec, texts: list[str]) -> dict:
    """Peak resident memory (MiB) of a fresh process that loads the entry and runs ``texts`` through it.

    The child (``python -m perf.memprobe``) imports only this module (and through it
    onnxruntime, or torch for the pipeline baseline), so an ONNX entry's figure does not
    include PyTorch.  Returns ``{"peak_rss_mb", "after_imports_mb", "model_mb"}``, or
    ``{"error": ...}`` if the child failed.
    """
    request = json.dumps({"entry": entry, "spec": asdict(spec), "texts": texts})
    proc = subprocess.run(
        [sys.executable, "-m", "perf.memprobe"],
        input=request,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    base, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = lambda b: round(b / 2**20, 3)  # noqa: E731
    return {"peak_rss_mb": mib(peak), "after_imports_mb": mib(base), "model_mb": mib(peak - base)}
