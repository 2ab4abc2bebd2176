"""What the GPU check times: PyTorch eager and ONNX Runtime (CUDA, IO binding, TensorRT) behind one interface.

Every engine turns texts into class probabilities (tokenize -> run -> softmax -> host memory),
with the served tokenizer: the Rust ``tokenizers`` one of the variant, truncated and padded as
serve.classifier.OnnxClassifier does.  So the ratios compare runtimes, not tokenizers.

* ``TorchEngine``: the fine-tuned PyTorch model, eager (SDPA attention, transformers' default),
  cast to fp16 / bf16 / fp32: what a user serving the checkpoint directly would run.
* ``OrtEngine``: serve/'s own ``OnnxClassifier`` on a variant, ``session.run`` with numpy in
  and out, or with IO binding (inputs copied into device OrtValues, the output bound on the
  device and copied back once), or with the TensorRT provider in front of CUDA.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from serve.classifier import OnnxClassifier, softmax
from serve.contract import UserError, VariantRecord

TENSORRT = "TensorrtExecutionProvider"
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvonnxparser.so.10")  # what onnxruntime-gpu 1.31's TensorRT EP links


class Skipped(Exception):
    """An engine that cannot run here, and why (one line): reported, not failed."""


class TorchEngine:
    """The PyTorch checkpoint in ``dtype`` on ``device``, eager, with the served tokenizer."""

    def __init__(self, name: str, model_dir: Path, record: VariantRecord, dtype: str, device: str):
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModelForSequenceClassification

        self.name, self.torch, self.device = name, torch, device
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        self.model = model.to(device=device, dtype=self.dtype).eval()
        # configured as OnnxClassifier configures it for the variant (same file, same length, same pad id)
        self.tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self.tokenizer.enable_truncation(record.max_length)
        self.tokenizer.enable_padding(pad_id=record.pad_token_id)
        self.placement = f"PyTorch {torch.__version__} eager {dtype} on {device}"

    def logits(self, texts: list[str]) -> np.ndarray:
        """float32 logits [len(texts), labels], computed in ``dtype``."""
        torch = self.torch
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.from_numpy(np.array([e.ids for e in encodings], dtype=np.int64)).to(self.device)
        mask = torch.from_numpy(np.array([e.attention_mask for e in encodings], dtype=np.int64)).to(self.device)
        with torch.inference_mode():
            return self.model(input_ids=ids, attention_mask=mask).logits.float().cpu().numpy()

    def predict(self, texts: list[str]) -> np.ndarray:
        return softmax(self.logits(texts))


class OrtEngine:
    """A variant in ONNX Runtime through serve/'s OnnxClassifier: ``run`` or IO binding, CUDA/CPU or TensorRT."""

    def __init__(
        self,
        name: str,
        directory: Path,
        record: VariantRecord,
        device: str,
        iobinding: bool = False,
        tensorrt_cache: Path | None = None,
    ):
        import onnxruntime as ort

        self.name, self.ort, self.iobinding = name, ort, iobinding
        self.clf = OnnxClassifier.load(directory, record, device=device, spin=False)
        self.device = "cuda" if self.clf.provider == "CUDAExecutionProvider" else "cpu"
        if tensorrt_cache is not None:
            self.clf.session = _tensorrt_session(ort, directory, record, tensorrt_cache)
            self.clf.provider = self.clf.session.get_providers()[0]
        self.output = self.clf.session.get_outputs()[0].name
        self.placement = f"ONNX Runtime {ort.__version__} {self.clf.provider}" + (", IO binding" if iobinding else "")
        self.provider_options = self.clf.session.get_provider_options().get(self.clf.provider, {})

    def logits(self, texts: list[str]) -> np.ndarray:
        encoded = self.clf.encode(texts)
        if not self.iobinding:
            return self.clf.logits(encoded)
        binding = self.clf.session.io_binding()
        for name, array in encoded.inputs.items():
            if self.device == "cuda":
                binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
            else:
                binding.bind_cpu_input(name, array)
        binding.bind_output(self.output, self.device)
        self.clf.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)

    def predict(self, texts: list[str]) -> np.ndarray:
        return softmax(self.logits(texts))


def tensorrt_missing() -> str | None:
    """Why the TensorRT provider cannot run here (one line), or None when its libraries load."""
    import onnxruntime as ort

    if TENSORRT not in ort.get_available_providers():
        return f"this onnxruntime ({ort.__version__}) has no {TENSORRT}"
    for library in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(library)
        except OSError as err:
            return f"the onnxruntime-gpu wheel carries the provider, but TensorRT 10 is not installed here ({err})"
    return None


def _tensorrt_session(ort, directory: Path, record: VariantRecord, cache: Path):
    """The fp32 graph under TensorRT (its own fp16 kernels), CUDA behind it for what TensorRT does not take.

    One optimization profile covers batch 1..128 and 1..max_length tokens, so new shapes do not
    rebuild the engine; the engine is built at the first run and cached in ``cache``.
    """
    cache.mkdir(parents=True, exist_ok=True)

    def shapes(batch: int, tokens: int) -> str:
        return ",".join(f"{name}:{batch}x{tokens}" for name in record.inputs)

    options = {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_profile_min_shapes": shapes(1, 1),
        "trt_profile_opt_shapes": shapes(32, min(64, record.max_length)),
        "trt_profile_max_shapes": shapes(128, record.max_length),
    }
    session = ort.InferenceSession(
        str(directory / "model.onnx"),
        providers=[(TENSORRT, options), ("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
    )
    if session.get_providers()[0] != TENSORRT:
        raise UserError(f"ONNX Runtime did not start {TENSORRT} (it runs on {session.get_providers()[0]})")
    session.disable_fallback()
    return session
