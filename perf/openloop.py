"""What perf's load tools share: their base config, the server they start, and the open-loop sender.

``LoadBase`` is the config both ``perf.loadgen`` and ``perf.reliability`` extend.  ``served``
starts a real ``bentoml serve`` with a fresh key; ``fire`` sends an open-loop stream of
requests with aiohttp at scheduled times (MLPerf's Server scenario: request i goes out at
its time whatever happened to the earlier ones, and its latency runs from that time, so
waiting inside the client counts); ``summarize`` turns the answers into a ``RateResult``.

The sender is aiohttp because it holds up past capacity: httpx took 10 ms of client CPU per
request at ~150 requests/s here (its pool gets slower as connections pile up), so the client,
not the server, set the pace.  Results are kept in preallocated arrays and each request's
task is created at its send time: an object per request made the client's garbage collector
slower over a 10-minute soak, and creating 30,000 tasks up front sent a burst at the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil

from serve.contract import Selection, UserError, VariantEntry, VariantRecord, VariantsManifest, read
from serve.launch import REPO, ServerProcess
from train.data import load_splits, spec_from_description

# Status codes for requests that got no HTTP answer, in the arrays fire() fills.
TIMEOUT, CONNECTION_ERROR = -1, -2


@dataclass(frozen=True)
class LoadBase:
    """The settings every load tool has: what to serve, where to run, how to send."""

    variants: str = field(default="artifacts/variants", metadata={"help": "variants directory (with manifest.json)"})
    variant: str | None = field(default=None, metadata={"help": "variant to serve (default: the one --selected names)"})
    selected: str = field(default="artifacts/selected.json", metadata={"help": "selection file written by perf/"})
    threads: int = field(
        default=0, metadata={"help": "ONNX Runtime threads in the server (0: one per core it may use)"}
    )
    connections: int = field(
        default=256,
        metadata={
            "help": "client connections: above the server's admission limit, so the server's 503s, not the client, "
            "limit; thousands of them cost the client more CPU than the server"
        },
    )
    timeout_s: float = field(
        default=5.0, metadata={"help": "per request, waiting for a connection included; a slower one counts as failed"}
    )
    warmup_requests: int = field(default=48, metadata={"help": "untimed requests after start, 8 at a time"})
    seed: int = field(default=0, metadata={"help": "arrival times and sentence order"})
    server_cpus: tuple[int, ...] = field(default=(), metadata={"help": "pin the server to these cores (default: all)"})
    client_cpus: tuple[int, ...] = field(
        default=(),
        metadata={"help": "pin this load generator to these cores (default: all, then it competes with the server)"},
    )
    working_dir: str = field(default=str(REPO), metadata={"help": "checkout whose serve/ is started"})
    output: str = field(default="artifacts/perf", metadata={"help": "report directory"})

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.connections < 1 or self.warmup_requests < 0 or self.threads < 0:
            raise UserError("--timeout-s must be > 0, --connections >= 1, --warmup-requests and --threads >= 0")

    @property
    def thread_count(self) -> int:
        """The service's own default with one worker: the cores it may run on."""
        return self.threads or len(self.server_cpus or os.sched_getaffinity(0))


def check_loopback(url: str) -> None:
    """Refuse anything but this machine: a load test aimed elsewhere is an attack."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UserError(f"--url {url} is not a loopback address; loadgen only targets 127.0.0.1, ::1 or localhost")


def pin(cpus: tuple[int, ...]) -> None:
    """Run this process on ``cpus`` (nothing when empty)."""
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as err:
            raise UserError(
                f"cannot pin to cores {list(cpus)}: {err.strerror}; this machine has cores "
                f"{sorted(os.sched_getaffinity(0))}"
            ) from None


@dataclass
class Target:
    """The variant under load: its manifest, entry, verified record and directory."""

    manifest: VariantsManifest
    entry: VariantEntry
    record: VariantRecord

    @property
    def directory(self) -> Path:
        return self.manifest.directory(self.entry)

    def server_env(self, threads: int) -> dict[str, str]:
        return {
            "TRIMSERVE_VARIANT_DIR": str(self.directory.resolve()),
            "TRIMSERVE_MANIFEST": str(self.manifest.root.resolve() / VariantsManifest.FILE),
            "TRIMSERVE_THREADS": str(threads),
        }


def pick_variant(config: LoadBase) -> Target:
    """``--variant``, or the selected one, of ``--variants``, with its files verified."""
    manifest = read(config.variants, VariantsManifest)
    name = config.variant
    if name is None:
        if not Path(config.selected).is_file():
            raise UserError(
                f"no --variant and {config.selected} does not exist; pass --variant "
                f"(one of {', '.join(v.name for v in manifest.ok())})"
            )
        name = read(config.selected, Selection).variant
    entry = manifest.entry(name)
    return Target(manifest, entry, manifest.load(entry))


def scored_sentences(manifest: VariantsManifest, seed: int) -> list[str]:
    """The test split the variants were scored on, in a seeded order (the same for every run)."""
    texts = load_splits(spec_from_description(manifest.data)).test["text"].tolist()
    return [texts[i] for i in np.random.default_rng(seed).permutation(len(texts))]


@contextlib.contextmanager
def served(
    env: dict, working_dir: str, cpus: tuple[int, ...] = (), ready_timeout_s: float = 180, log: Path | None = None
) -> Iterator[tuple[str, str, int]]:
    """``bentoml serve`` on a free loopback port with a fresh key; yields (url, key, pid).

    The server's output goes to ``log`` (default: a file removed with the server)."""
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        key = secrets.token_urlsafe(24)
        (Path(tmp) / "keys").write_text(key + "\n")
        with ServerProcess(
            {**env, "TRIMSERVE_API_KEYS_FILE": f"{tmp}/keys"},
            log or Path(tmp) / "server.log",
            working_dir,
            home=f"{tmp}/home",
            cpus=cpus,
        ) as server:
            print(f"  ready in {server.wait_ready(ready_timeout_s):.1f} s")
            yield server.url, key, server.pid


def session(url: str, key: str | None, connections: int, timeout_s: float):
    """An aiohttp session for ``url`` with the bearer key; ``timeout_s`` covers a whole request."""
    import aiohttp

    return aiohttp.ClientSession(
        url,
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"authorization": f"Bearer {key}"} if key else {},
    )


async def post(client, text: str) -> int:
    """POST one text to /classify; the HTTP status, or TIMEOUT / CONNECTION_ERROR."""
    import aiohttp

    try:
        async with client.post("/classify", json={"texts": [text]}) as response:
            await response.read()
            return response.status
    except TimeoutError:
        return TIMEOUT
    except aiohttp.ClientError:
        return CONNECTION_ERROR


async def warm_up(client, texts: list[str], n: int) -> None:
    """Untimed bursts of 8: BentoML runs its first ~10 calls one by one while it calibrates."""
    for start in range(0, n, 8):
        burst = [texts[i % len(texts)] for i in range(start, min(n, start + 8))]
        statuses = await asyncio.gather(*(post(client, text) for text in burst))
        if statuses and statuses[0] != 200:
            raise UserError(
                f"the server answered {statuses[0]} to a warm-up request; for --url pass --api-key-file "
                "with a key it accepts"
            )


async def metrics_text(client) -> str:
    async with client.get("/metrics") as response:
        return await response.text()


def poisson_schedule(rate: float, duration_s: float, max_requests: int, seed: int) -> np.ndarray:
    """Send times (s) of a Poisson stream: exponential gaps of mean 1/rate, within duration_s and max_requests."""
    rng = np.random.default_rng([seed, round(rate * 1000)])
    times = np.cumsum(rng.exponential(1 / rate, size=max_requests))
    return times[times < duration_s]


@dataclass
class Answers:
    """What came back for each scheduled request: latency (s from its scheduled time) and status."""

    latency_s: np.ndarray  # float64 [requests]
    status: np.ndarray  # int64 [requests]: HTTP status, TIMEOUT or CONNECTION_ERROR


async def fire(client, schedule: np.ndarray, texts: list[str]) -> Answers:
    """Open loop: request i goes out at ``schedule[i]`` seconds whatever happened to the earlier ones."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    answers = Answers(np.zeros(len(schedule)), np.zeros(len(schedule), dtype=np.int64))

    async def one(i: int, text: str) -> None:
        answers.status[i] = await post(client, text)
        answers.latency_s[i] = loop.time() - (start + schedule[i])

    pending: set[asyncio.Task] = set()
    for i, at in enumerate(schedule):
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        task = asyncio.create_task(one(i, texts[i % len(texts)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
    while pending:
        await asyncio.wait(set(pending))
    return answers


class CpuClock:
    """CPU seconds of this process (the client) and of the server's process tree, when it is ours."""

    def __init__(self, server_pid: int | None):
        self.server = psutil.Process(server_pid) if server_pid else None

    def read(self) -> tuple[float, float | None]:
        if self.server is None:
            return time.process_time(), None
        tree = [self.server, *self.server.children(recursive=True)]
        return time.process_time(), sum(sum(p.cpu_times()[:2]) for p in tree)

    @staticmethod
    def per_request(before: tuple, after: tuple, n: int) -> tuple[float | None, float | None]:
        ms = lambda a, b: None if a is None or not n else round(1e3 * (b - a) / n, 2)  # noqa: E731
        return ms(before[0], after[0]), ms(before[1], after[1])


@dataclass
class RateResult:
    offered_rps: float
    sent: int
    ok: int  # 200s
    non_200: dict[str, int]  # status code -> count (503 overload, 504 timeout...)
    errors: int  # no response: client timeout or connection error
    throughput_rps: float  # 200s per second of the window (first send to last response)
    p50_ms: float | None  # latency percentiles of the 200s
    p90_ms: float | None
    p99_ms: float | None
    client_cpu_ms: float | None = None  # CPU time per request: the load generator's process...
    server_cpu_ms: float | None = None  # ...and the server's processes (arbiter and workers)

    @property
    def error_share(self) -> float:
        return (self.sent - self.ok) / self.sent if self.sent else 0.0

    def holds(self, p99_bound_ms: float, max_error_share: float) -> bool:
        return self.p99_ms is not None and self.p99_ms <= p99_bound_ms and self.error_share <= max_error_share

    def to_dict(self, p99_bound_ms: float, max_error_share: float) -> dict:
        return {
            **asdict(self),
            "error_share": round(self.error_share, 4),
            "holds": self.holds(p99_bound_ms, max_error_share),
        }


def summarize(answers: Answers, schedule: np.ndarray, rate: float, duration_s: float) -> RateResult:
    """Counts by status and latency percentiles (ms, of the 200s) of one stream."""
    ok = answers.latency_s[answers.status == 200] * 1e3
    codes, counts = np.unique(answers.status[(answers.status != 200) & (answers.status > 0)], return_counts=True)
    errors = int((answers.status <= 0).sum())
    # Arrivals stop at duration_s; the last replies trail behind it.
    window = float(max([duration_s, *(schedule + answers.latency_s)]))
    p50, p90, p99 = np.percentile(ok, [50, 90, 99], method="inverted_cdf").round(2).tolist() if len(ok) else [None] * 3
    return RateResult(
        rate,
        len(schedule),
        len(ok),
        {str(c): int(n) for c, n in zip(codes, counts, strict=True)},
        errors,
        round(len(ok) / window, 2),
        p50,
        p90,
        p99,
    )


def placement(cpus: dict) -> str:
    if cpus["server"] == "all" and cpus["client"] == "all":
        return "client on the same machine, sharing its cores"
    return f"server pinned to cores {cpus['server']}, client to cores {cpus['client']}"
