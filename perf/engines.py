"""The things perf/ times, behind one small interface.

* ``PipelineEngine``: transformers ``pipeline("text-classification")`` on the PyTorch fp32
  model, eager: what most users start with (baseline a).
* ``OnnxEngine``: serve/'s own ``OnnxClassifier`` (tokenize -> ONNX Runtime -> softmax) on a
  variant directory, so the timed path is the served path (variants and baseline b).

Each engine can classify one text, classify a batch, and run the bare model on a synthetic
batch of an exact shape (for the shape sweep, tokenization excluded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serve.classifier import Encoded, OnnxClassifier, batched_logits


class OnnxEngine:
    def __init__(self, name: str, directory: Path, threads: int, max_length: int, spin: bool):
        self.name = name
        self.clf = OnnxClassifier(directory, threads=threads, max_length=max_length, device="cpu", spin=spin)

    def predict_one(self, text: str) -> None:
        self.clf.predict([text])

    def predict_batch(self, texts: list[str]) -> None:
        self.clf.predict(texts)

    def forward_shape(self, ids: np.ndarray) -> None:
        mask = np.ones_like(ids)
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        self.clf.logits(Encoded({n: arrays[n] for n in self.clf.input_names}, int(mask.sum()), 0))

    def logits(self, texts: list[str]) -> np.ndarray:
        return batched_logits(self.clf, texts, 64)


class PipelineEngine:
    def __init__(self, name: str, model_dir: Path, threads: int, max_length: int):
        import torch
        from transformers import pipeline

        torch.set_num_threads(threads)
        self.name = name
        self.torch = torch
        self.max_length = max_length
        self.pipe = pipeline("text-classification", model=str(model_dir), device=-1, top_k=None,
                             truncation=True, max_length=max_length)
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
                batch = tokenizer(texts[start:start + 64], truncation=True, padding=True,
                                  max_length=self.max_length, return_tensors="pt")
                out.append(self.model(**batch).logits.float().numpy())
        return np.concatenate(out)


def make_engine(entry: dict, threads: int, max_length: int, spin: bool):
    """The engine for a report entry: the pipeline for the PyTorch baseline, else ONNX."""
    if entry["kind"] == "baseline" and entry["name"] == "baseline-pipeline":
        return PipelineEngine(entry["name"], Path(entry["path"]), threads, max_length)
    return OnnxEngine(entry["name"], Path(entry["path"]), threads, max_length, spin)
