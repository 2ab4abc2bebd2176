"""What the service serves and how: ``ServeConfig``, read from ``TRIMSERVE_*`` variables.

One variable per field (``max_batch_size`` is ``TRIMSERVE_MAX_BATCH_SIZE``).  A value that
does not parse, is out of range, or a ``TRIMSERVE_*`` name that is not a field fails with
one line naming the variable, the value and why.  :func:`resolve_variant` then finds the
variant to serve and checks every file's sha256 against what export/ recorded.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from serve.contract import MODEL_FILE, VARIANT_RECORD, Selection, UserError, VariantRecord, VariantsManifest, read

PREFIX = "TRIMSERVE_"
CPU_BATCH = 32  # texts per model call on CPU: past this the cores are busy and latency only grows
GPU_BATCH = 128  # a GPU is only busy with large batches; perf/gpu_check.sh times 8, 32 and 128
CPU_CONCURRENCY = 32


@dataclass(frozen=True)
class ServeConfig:
    selected: str = field(
        default="artifacts/selected.json",
        metadata={"help": "selection file written by perf/: the variant and the manifest (by sha256) it belongs to"},
    )
    variant_dir: str | None = field(
        default=None,
        metadata={"help": "serve this variant dir instead of the selection; hashes come from the manifest"},
    )
    manifest: str | None = field(
        default=None,
        metadata={"help": "variants manifest for variant_dir (default: manifest.json beside the variant dir)"},
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "ONNX Runtime intra-op threads per worker (default: CPU cores / workers, so workers don't fight)"
        },
    )
    spin: bool = field(
        default=False,
        metadata={
            "help": "let ONNX Runtime's threads busy-wait between calls (lowest latency on an idle, dedicated machine; "
            "off, they leave the cores to HTTP handling and tokenization)"
        },
    )
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto",
        metadata={
            "help": "auto: CUDA when onnxruntime-gpu sees a GPU, else CPU; cuda: refuse to start unless ONNX "
            "Runtime's CUDA provider runs the model here, and take the GPU defaults of workers, max_batch_size "
            "and max_concurrency"
        },
    )
    max_batch_size: int | None = field(
        default=None,
        metadata={
            "help": f"texts per model call (default {CPU_BATCH}; {GPU_BATCH} with device cuda); bigger batches pay "
            "off when a call costs more than the request around it (fp32 and static int8 variants, long texts) and "
            "a GPU's only at much larger ones; variants that are not batch-invariant always run one text per call"
        },
    )
    max_batch_tokens: int = field(
        default=4096,
        metadata={
            "help": "padded tokens per model call (texts x longest text): a long text never pads many short ones; "
            "a single text longer than this still runs, alone"
        },
    )
    max_padding: float = field(
        default=0.1,
        metadata={
            "help": "a model call's padding tokens at most this share of its real tokens: texts of similar lengths "
            "batch together, since padding costs like real tokens (arrival-order batches of test sentences padded "
            "1.4-1.9x and ran slower per text than one text at a time)"
        },
    )
    max_latency_ms: int = field(
        default=500,
        metadata={
            "help": "batching deadline: texts that waited longer for the model get 503 at once instead of running "
            "late; keep it several times the run time of a full batch"
        },
    )
    batching: bool = field(
        default=True,
        metadata={
            "help": "merge concurrent requests into one model call (what queued while the model was busy, up to "
            "max_batch_size texts and max_batch_tokens); 0: one model call per request"
        },
    )
    fast_path: bool = field(
        default=True,
        metadata={
            "help": "trimserve's own /classify path and continuous batching (README, Operations); 0: BentoML's route "
            "and adaptive batching after the same checks, the slower path kept for comparison"
        },
    )
    access_log: bool = field(
        default=True,
        metadata={
            "help": "one log line per request: method, path, status, bytes, texts, milliseconds (no text, no key)"
        },
    )
    tracing: bool = field(
        default=False,
        metadata={
            "help": "BentoML's OpenTelemetry spans for /classify too (off, the route is excluded from tracing, which "
            "costs CPU per request even when nothing is sampled; turn on when you export traces)"
        },
    )
    bentoml_metrics: bool = field(
        default=True,
        metadata={
            "help": "BentoML's own bentoml_service_* request metrics next to trimserve's (a middleware per request)"
        },
    )
    max_texts_per_request: int = field(default=64, metadata={"help": "more texts in one request gives 400"})
    max_text_chars: int = field(
        default=10_000,
        metadata={
            "help": "a longer text gives 400; shorter texts over the model's token limit are truncated and counted"
        },
    )
    max_concurrency: int | None = field(
        default=None,
        metadata={
            "help": f"requests being classified at once over all workers; one more gets 503 with Retry-After at once "
            f"instead of queueing (default {CPU_CONCURRENCY}: one CPU replica here does 225-300 requests/s, so 32 "
            "waiting is ~0.1-0.15 s of work; with device cuda, two full batches per worker, or batches of one-text "
            "requests could never fill up)"
        },
    )
    max_lag_ms: float = field(
        default=200.0,
        metadata={
            "help": "new requests get 503 while the event loop runs this far behind (requests waiting unread in socket "
            "buffers past capacity); 0: off"
        },
    )
    max_body_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata={
            "help": "larger request bodies get 413 before they are read (64 texts of 10,000 characters: 0.6 MB in "
            "ASCII, 2.6 MB in 4-byte UTF-8)"
        },
    )
    timeout_s: float = field(default=10.0, metadata={"help": "a request still running after this gets 504"})
    body_timeout_s: float = field(
        default=5.0,
        metadata={
            "help": "a request body not complete after this gets 408 (below timeout_s, whose 504 would come first)"
        },
    )
    workers: int | None = field(
        default=None,
        metadata={
            "help": "worker processes, each with its own model copy (default 1; with device cuda, one per visible "
            "GPU, worker i on GPU i)"
        },
    )
    api_keys: tuple[str, ...] = field(
        default=(),
        repr=False,
        metadata={
            "help": "comma-separated bearer keys or sha256:<hex> digests (prefer api_keys_file: env vars show up in "
            "process listings, and a file can change without a restart)"
        },
    )
    api_keys_file: str | None = field(
        default=None,
        metadata={
            "help": "file with one bearer key, or its sha256:<hex> digest (python -m serve hash-key), per line; "
            "re-read "
            "within a second when it changes"
        },
    )
    allow_no_auth: bool = field(
        default=False,
        metadata={
            "help": "serve without keys (only behind a gateway that authenticates); "
            "without it, no keys refuses to start"
        },
    )
    protect_metrics: bool = field(default=False, metadata={"help": "require a key for /metrics too"})

    rate_limit_rps: float = field(
        default=0.0,
        metadata={"help": "per-key requests/s, per worker, over which a key gets 429 with Retry-After (0: no limit)"},
    )
    rate_limit_burst: int = field(default=20, metadata={"help": "requests a key may send at once above its rate"})

    def __post_init__(self) -> None:
        for name, value in self._device_defaults().items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: defaults are filled in once, here
        for name, low in [
            ("max_batch_size", 2),
            ("max_latency_ms", 1),
            ("max_texts_per_request", 1),
            ("max_text_chars", 1),
            ("max_concurrency", 1),
            ("workers", 1),
            ("threads", 1),
            ("max_body_bytes", 1024),
            ("rate_limit_burst", 1),
        ]:
            value = getattr(self, name)
            if value is not None and value < low:
                raise UserError(f"{env_name(name)}={value!r} is not valid: expected an integer >= {low}")
        if self.max_lag_ms < 0:
            raise UserError(f"{env_name('max_lag_ms')}={self.max_lag_ms!r} is not valid: expected milliseconds >= 0")
        if self.max_padding < 0:
            raise UserError(f"{env_name('max_padding')}={self.max_padding!r} is not valid: expected a share >= 0")
        if self.rate_limit_rps < 0:
            raise UserError(
                f"{env_name('rate_limit_rps')}={self.rate_limit_rps!r} is not valid: expected requests/s >= 0"
            )
        if self.timeout_s <= 0:
            raise UserError(f"{env_name('timeout_s')}={self.timeout_s!r} is not valid: expected seconds > 0")
        if not 0 < self.body_timeout_s < self.timeout_s:
            raise UserError(
                f"{env_name('body_timeout_s')}={self.body_timeout_s!r} is not valid: expected seconds > 0 "
                f"and below {env_name('timeout_s')}={self.timeout_s!r}"
            )
        if not (self.api_keys or self.allow_no_auth):
            raise UserError(
                f"no API keys: set {env_name('api_keys_file')} (one key per line) or {env_name('api_keys')}, "
                f"or {env_name('allow_no_auth')}=1 to serve without auth behind an authenticating gateway"
            )

    def _device_defaults(self) -> dict[str, int]:
        """workers, max_batch_size and max_concurrency when not set: CPU defaults, or the GPU's with device cuda."""
        if self.device != "cuda":
            return {"workers": 1, "max_batch_size": CPU_BATCH, "max_concurrency": CPU_CONCURRENCY}
        workers = self.workers or max(1, visible_gpus())
        batch = self.max_batch_size or GPU_BATCH
        return {"workers": workers, "max_batch_size": batch, "max_concurrency": 2 * batch * workers}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeConfig:
        """The config from ``TRIMSERVE_*`` variables (``os.environ`` unless given)."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        fields = {env_name(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in environ if k.startswith(PREFIX) and k not in fields)
        if unknown:
            raise UserError(f"unknown variable {unknown[0]}; trimserve reads {', '.join(fields)}")
        # An empty variable counts as unset, as container and Kubernetes manifests often leave them.
        values = {
            f.name: _parse(var, environ[var].strip(), hints[f.name])
            for var, f in fields.items()
            if environ.get(var, "").strip()
        }
        if values.get("api_keys_file"):
            if values.get("api_keys"):
                raise UserError(f"both {env_name('api_keys')} and {env_name('api_keys_file')} are set; set only one")
            values["api_keys"] = read_keys(Path(values["api_keys_file"]))
        return cls(**values)

    @property
    def ort_threads(self) -> int:
        """ONNX Runtime intra-op threads per worker: ``threads``, else the cores available split over the workers."""
        return self.threads or max(1, available_cores()[0] // self.workers)


CGROUP = Path("/sys/fs/cgroup")


def available_cores(cgroup: Path = CGROUP) -> tuple[int, str]:
    """The cores this process may use and where that figure comes from.

    The smaller of the CPUs it may run on (affinity) and the container's CPU quota, rounded
    up: under ``docker run --cpus=1`` on a many-core host ONNX Runtime would otherwise start a
    thread per host core on one CPU of quota and be throttled (p99 spikes).  Reads cgroup v2
    ``cpu.max`` or v1 ``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us``.
    """
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g}"
    return affinity, "CPU affinity"


def cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """CPUs' worth of the cgroup's CFS quota (e.g. 1.5), or None when there is no limit."""
    try:
        if (cgroup / "cpu.max").is_file():  # v2: "<quota> <period>" or "max <period>"
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:  # v1
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def _parse(var: str, raw: str, tp: typing.Any) -> typing.Any:
    """One variable's text as the field's type, or a UserError naming the variable."""
    if type(None) in typing.get_args(tp):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        if raw not in typing.get_args(tp):
            raise UserError(f"{var}={raw!r} is not valid: expected one of {', '.join(typing.get_args(tp))}")
        return raw
    if tp is bool:
        if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise UserError(f"{var}={raw!r} is not valid: expected 1/true/yes or 0/false/no")
        return raw.lower() in ("1", "true", "yes")
    if typing.get_origin(tp) is tuple:  # the API keys: never echo the value
        keys = tuple(k.strip() for k in raw.split(",") if k.strip())
        if not keys:
            raise UserError(f"{var} is set but holds no keys: expected comma-separated keys")
        return keys
    try:
        return tp(raw)
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(tp, tp.__name__)
        raise UserError(f"{var}={raw!r} is not valid: expected {kind}") from None


def read_keys(path: Path) -> tuple[str, ...]:
    """The keys file's keys as sha256 digests (see serve.auth: plain keys or ``sha256:<hex>`` lines)."""
    from serve.auth import parse_keys

    var = env_name("api_keys_file")
    if not path.is_file():
        raise UserError(f"{var}={str(path)!r} is not valid: no such file")
    try:
        keys = parse_keys(path.read_text().splitlines())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{var}={str(path)!r} is not valid: {err}") from None
    if not keys:
        raise UserError(f"{var}={str(path)!r} is not valid: the file holds no keys")
    return keys


@dataclass(frozen=True)
class Variant:
    """A variant whose files all match their recorded sha256, with its record."""

    name: str
    directory: Path
    record: VariantRecord
    model_sha256: str
    files: int


def check_device(config: ServeConfig, model: Path) -> None:
    """TRIMSERVE_DEVICE=cuda needs ONNX Runtime's CUDA provider to run ``model`` here: say so before any worker starts.

    ONNX Runtime itself would fall back to CPU with a logged warning; the service refuses instead.
    """
    if config.device != "cuda":
        return
    import onnxruntime

    from serve.classifier import probe_provider

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise UserError(
            f"{env_name('device')}=cuda but this onnxruntime has no CUDAExecutionProvider; "
            "install onnxruntime-gpu (pip install .[gpu]) on a machine with CUDA"
        )
    problem = probe_provider(model, "CUDAExecutionProvider")
    if problem:
        raise UserError(
            f"{env_name('device')}=cuda but ONNX Runtime's CUDA provider does not run the model here ({problem}); "
            "check the GPU (nvidia-smi) and the CUDA 13 / cuDNN 9 libraries onnxruntime-gpu needs"
        )


def visible_gpus() -> int:
    """GPUs this process may use: those CUDA_VISIBLE_DEVICES names, else all the driver reports (0 without one)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",")]
        return len(list(itertools.takewhile(lambda d: d not in ("", "-1"), ids)))  # CUDA stops at the first bad id
    try:
        import pynvml  # nvidia-ml-py, a BentoML dependency; it talks to the driver without a CUDA context
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def gpu_of_worker(worker_index: int | None) -> int:
    """The GPU (CUDA device id) of BentoML worker ``worker_index`` (1-based; None outside a server): one per GPU."""
    return (worker_index - 1) % max(1, visible_gpus()) if worker_index else 0


def resolve_variant(config: ServeConfig) -> Variant:
    """The variant to serve, after checking every one of its files against its recorded sha256.

    From the selection file (default), or from ``variant_dir`` and the manifest beside it (or
    ``manifest``).  Raises UserError naming the file that is missing, changed or inconsistent.
    """
    if config.variant_dir:
        directory = Path(config.variant_dir)
        manifest = read(Path(config.manifest) if config.manifest else directory.parent, VariantsManifest)
        entry = manifest.entry(_claimed_name(directory))
        record = manifest.load(entry, directory)
    else:
        manifest, entry, record = read(config.selected, Selection).resolve()
        directory = manifest.directory(entry)
    return Variant(entry.name, directory, record, entry.files[MODEL_FILE]["sha256"], len(entry.files))


def _claimed_name(directory: Path) -> str:
    """The name a variant directory's record gives itself; it is verified with the other files after."""
    try:
        return str(json.loads((directory / VARIANT_RECORD).read_text())["name"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{directory} holds no readable {VARIANT_RECORD}; {env_name('variant_dir')} must name a "
            "variant directory written by `python -m export`"
        ) from None
