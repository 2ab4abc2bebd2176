"""What perf's load tools share: their base config, the server they start, and the load itself.

``LoadBase`` is the config both ``perf.loadgen`` and ``perf.reliability`` extend.  ``served``
starts a real ``bentoml serve`` with a fresh key.  Load comes two ways:

* open loop, MLPerf's Server scenario: :func:`server_scenario` lets MLPerf Inference LoadGen
  (``mlcommons-loadgen``) issue queries at Poisson-distributed times for a target rate; the
  SUT (:class:`HttpSut`) sends each one as a request with aiohttp on an event loop of its own
  and completes it when the answer is in.  LoadGen times each query from its scheduled
  issue to its completion and gives its verdict (VALID / INVALID: latency bound at the 99th
  percentile, duration, query count, early stopping); the SUT keeps each answer's status
  and latency, for error shares and per-window figures LoadGen does not report.
* closed loop: :func:`closed_loop` keeps N clients each sending its next request as soon as
  the previous one is answered (the 32-client batching comparison).

The client is aiohttp because it holds up past capacity: httpx took 10 ms of client CPU per
request at ~150 requests/s here (its pool gets slower as connections pile up), so the client,
not the server, set the pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import secrets
import tempfile
import threading
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

# Status codes for requests that got no HTTP answer, in the arrays the load functions fill.
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
    server_env: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "extra TRIMSERVE_*=value settings for the servers started, e.g. TRIMSERVE_MAX_CONCURRENCY=16"
        },
    )
    output: str = field(default="artifacts/perf", metadata={"help": "report directory"})

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.connections < 1 or self.warmup_requests < 0 or self.threads < 0:
            raise UserError("--timeout-s must be > 0, --connections >= 1, --warmup-requests and --threads >= 0")
        bad = [s for s in self.server_env if "=" not in s or not s.startswith(("TRIMSERVE_", "BENTOML_"))]
        if bad:
            raise UserError(f"--server-env {bad[0]!r} is not valid: expected TRIMSERVE_NAME=value")

    @property
    def extra_env(self) -> dict[str, str]:
        return dict(s.split("=", 1) for s in self.server_env)

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
) -> Iterator[tuple[str, str, ServerProcess]]:
    """``bentoml serve`` on a free loopback port with a fresh key; yields (url, key, server).

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
            yield server.url, key, server


# --- the client --------------------------------------------------------------------------------


def session(url: str, key: str | None, connections: int, timeout_s: float):
    """An aiohttp session for ``url`` with the bearer key; ``timeout_s`` covers a whole request."""
    import aiohttp

    return aiohttp.ClientSession(
        url,
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"authorization": f"Bearer {key}"} if key else {},
    )


async def post(client, texts: list[str]) -> int:
    """POST texts to /classify; the HTTP status, or TIMEOUT / CONNECTION_ERROR."""
    import aiohttp

    try:
        async with client.post("/classify", json={"texts": texts}) as response:
            await response.read()
            return response.status
    except TimeoutError:
        return TIMEOUT
    except aiohttp.ClientError:
        return CONNECTION_ERROR


async def warm_up(client, texts: list[str], n: int) -> None:
    """Untimed bursts of 8: the first calls of a fresh server allocate what later ones reuse."""
    for start in range(0, n, 8):
        burst = [texts[i % len(texts)] for i in range(start, min(n, start + 8))]
        statuses = await asyncio.gather(*(post(client, [text]) for text in burst))
        if statuses and statuses[0] != 200:
            raise UserError(
                f"the server answered {statuses[0]} to a warm-up request; for --url pass --api-key-file "
                "with a key it accepts"
            )


async def metrics_text(client) -> str:
    async with client.get("/metrics") as response:
        return await response.text()


@dataclass
class Answers:
    """What came back for each request: when it was issued (s, client clock), latency (s) and status."""

    issued_s: np.ndarray  # float64 [requests]
    latency_s: np.ndarray  # float64 [requests]
    status: np.ndarray  # int64 [requests]: HTTP status, TIMEOUT or CONNECTION_ERROR

    @classmethod
    def empty(cls, n: int) -> Answers:
        return cls(np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64))


class ClientLoop:
    """An asyncio event loop in a thread of its own, with one aiohttp session: LoadGen's SUT calls into it."""

    def __init__(self, url: str, key: str | None, connections: int, timeout_s: float):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="loadgen-client", daemon=True)
        self.thread.start()
        self.client = self.run(self._open(url, key, connections, timeout_s))

    async def _open(self, url, key, connections, timeout_s):
        return session(url, key, connections, timeout_s)

    def run(self, coroutine, timeout_s: float | None = None):
        """Run a coroutine on the client loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self) -> None:
        self.run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class HttpSut:
    """MLPerf LoadGen's system under test: each query sample is one /classify request of one text.

    ``issue_query`` runs on LoadGen's thread; the request runs on the client loop; its
    completion goes back to LoadGen with ``QuerySamplesComplete``.  Every sample is completed,
    answered or not, and its status kept, so failures count as failures (LoadGen itself only
    sees latency).
    """

    def __init__(self, client: ClientLoop, texts: list[str], expected: int):
        import mlperf_loadgen as lg

        self.lg, self.client, self.texts = lg, client, texts
        self.answers = Answers.empty(expected)
        self.count = 0
        self.origin = time.perf_counter()
        self.handle = lg.ConstructSUT(self.issue_query, self.flush_queries)

    def issue_query(self, samples) -> None:
        for sample in samples:
            i, self.count = self.count, self.count + 1
            if i >= len(self.answers.status):  # LoadGen may issue a few more than asked
                self.answers = Answers(*(np.concatenate([a, np.zeros_like(a)]) for a in asdict(self.answers).values()))
            self.answers.issued_s[i] = time.perf_counter() - self.origin
            asyncio.run_coroutine_threadsafe(self._send(i, sample), self.client.loop)

    async def _send(self, i: int, sample) -> None:
        status = await post(self.client.client, [self.texts[sample.index % len(self.texts)]])
        self.answers.status[i] = status
        self.answers.latency_s[i] = time.perf_counter() - self.origin - self.answers.issued_s[i]
        self.lg.QuerySamplesComplete([self.lg.QuerySampleResponse(sample.id, 0, 0)])

    def flush_queries(self) -> None:
        pass

    def take(self) -> Answers:
        """The answers so far, trimmed to the samples issued."""
        n = self.count
        return Answers(
            self.answers.issued_s[:n].copy(), self.answers.latency_s[:n].copy(), self.answers.status[:n].copy()
        )


def server_scenario(
    client: ClientLoop, texts: list[str], rate: float, duration_s: float, p99_bound_ms: float, seed: int, log_dir: Path
) -> tuple[Answers, dict]:
    """LoadGen's Server scenario at ``rate`` queries/s for ``duration_s``: the answers and LoadGen's summary.

    The summary is LoadGen's own mlperf_log_summary.txt as a dict (``result`` VALID/INVALID,
    ``completed_samples_per_second``, ``p50_ms`` ... ``p99_ms``, ``early_stopping_p99_ms``...);
    the log files stay in ``log_dir``.
    """
    import mlperf_loadgen as lg

    settings = lg.TestSettings()
    settings.scenario = lg.TestScenario.Server
    settings.mode = lg.TestMode.PerformanceOnly
    settings.server_target_qps = rate
    settings.server_target_latency_ns = int(p99_bound_ms * 1e6)
    settings.server_target_latency_percentile = 0.99
    settings.min_duration_ms = settings.max_duration_ms = int(duration_s * 1000)
    settings.min_query_count = 1
    settings.schedule_rng_seed = settings.sample_index_rng_seed = settings.qsl_rng_seed = seed
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = lg.LogSettings()
    logs.log_output.outdir = str(log_dir)
    logs.log_output.copy_summary_to_stdout = False
    logs.enable_trace = False
    sut = HttpSut(client, texts, int(rate * duration_s * 1.2) + 16)
    qsl = lg.ConstructQSL(len(texts), len(texts), lambda _: None, lambda _: None)
    try:
        lg.StartTestWithLogSettings(sut.handle, qsl, settings, logs)
    finally:
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut.handle)
    return sut.take(), loadgen_summary(log_dir / "mlperf_log_summary.txt")


def loadgen_summary(path: Path) -> dict:
    """The figures of LoadGen's mlperf_log_summary.txt, latencies in ms."""
    fields = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and value.strip():
            fields[key.strip()] = value.strip()
    ms = lambda key: round(int(fields[key]) / 1e6, 3) if key in fields else None  # noqa: E731
    early = next(
        (
            float(m.group(1)) / 1e6
            for line in path.read_text().splitlines()
            if (m := re.search(r"Early stopping 99(?:\.00)?th percentile estimate\s*:\s*(\d+)", line))
        ),
        None,
    )
    return {
        "result": fields.get("Result is"),
        "scenario": fields.get("Scenario"),
        "completed_samples_per_second": float(fields.get("Completed samples per second", "nan")),
        "scheduled_samples_per_second": float(fields.get("Scheduled samples per second", "nan")),
        "early_stopping_satisfied": fields.get("Early stopping satisfied"),
        "performance_constraints_satisfied": fields.get("Performance constraints satisfied"),
        "p50_ms": ms("50.00 percentile latency (ns)"),
        "p90_ms": ms("90.00 percentile latency (ns)"),
        "p99_ms": ms("99.00 percentile latency (ns)"),
        "max_ms": ms("Max latency (ns)"),
        "early_stopping_p99_ms": round(early, 3) if early is not None else None,
    }


def closed_loop(
    client: ClientLoop, texts: list[str], clients: int, duration_s: float, texts_per_request: int = 1
) -> Answers:
    """``clients`` concurrent clients, each sending its next request when the last is answered."""

    async def run() -> Answers:
        answers, origin, stop = Answers.empty(0), time.perf_counter(), time.perf_counter() + duration_s
        records: list[tuple[float, float, int]] = []

        async def one(c: int) -> None:
            i = c
            while time.perf_counter() < stop:
                issued = time.perf_counter()
                batch = [texts[(i + k) % len(texts)] for k in range(texts_per_request)]
                status = await post(client.client, batch)
                records.append((issued - origin, time.perf_counter() - issued, status))
                i += clients

        await asyncio.gather(*(one(c) for c in range(clients)))
        if records:
            issued, latency, status = zip(*records, strict=True)
            answers = Answers(np.array(issued), np.array(latency), np.array(status, dtype=np.int64))
        return answers

    return client.run(run())


class CpuClock:
    """CPU seconds of this process (the client) and of the server's process tree, with its worker threads by name."""

    def __init__(self, server: ServerProcess | None):
        self.server = psutil.Process(server.pid) if server else None

    def read(self) -> dict:
        out = {"client": time.process_time()}
        if self.server is not None:
            tree = [self.server, *self.server.children(recursive=True)]
            out["server"] = sum(sum(p.cpu_times()[:2]) for p in tree)
            for worker in self.server.children(recursive=True):
                for thread in _threads(worker.pid):
                    out[f"thread:{thread[0]}"] = out.get(f"thread:{thread[0]}", 0.0) + thread[1]
        return out

    @staticmethod
    def per_request(before: dict, after: dict, n: int) -> dict:
        """CPU milliseconds per request between two readings, by part (client, server, server threads)."""
        return {k: round(1e3 * (after[k] - before.get(k, 0.0)) / n, 3) for k in after} if n else {}


def _threads(pid: int) -> list[tuple[str, float]]:
    """(name, CPU seconds) of each thread of ``pid``; the main thread is named 'event-loop'."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found.append(("event-loop" if task.name == str(pid) else name, (int(fields[11]) + int(fields[12])) / ticks))
    return found


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
    cpu_ms: dict = field(default_factory=dict)  # CPU per request: client, server, server threads by name
    loadgen: dict | None = None  # LoadGen's own summary (Server scenario)

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


def summarize(answers: Answers, rate: float, duration_s: float) -> RateResult:
    """Counts by status and latency percentiles (ms, of the 200s) of one stream of requests."""
    ok = answers.latency_s[answers.status == 200] * 1e3
    codes, counts = np.unique(answers.status[(answers.status != 200) & (answers.status > 0)], return_counts=True)
    errors = int((answers.status <= 0).sum())
    # Arrivals stop at duration_s; the last replies trail behind it.
    window = float(max([duration_s, *(answers.issued_s + answers.latency_s)]))
    p50, p90, p99 = np.percentile(ok, [50, 90, 99], method="inverted_cdf").round(2).tolist() if len(ok) else [None] * 3
    return RateResult(
        rate,
        len(answers.status),
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
