"""Continuous batching: whatever is queued when the model becomes free runs together.

One model thread per worker takes the jobs queued since its last call, sorts their texts by
length and runs them in model calls of similar lengths: up to ``max_batch_size`` texts,
``max_batch_tokens`` padded tokens and ``max_padding`` padding (so a long text never pads many
short ones: padding costs like real tokens).  It hands each job its probabilities back on the
event loop: one thread hop per round each way, none per text.  At low load a job runs at once (no waiting to fill
a batch); under load the queue that forms while the model is busy is the batch.

Why not BentoML's adaptive batching: measured here (README, Operations), its dispatcher
merged 1.17 one-text requests per model call and sustained 0.68x the rate of no batching,
and the path around it cost 3-5 ms of CPU per request against ~2 ms for the model.

A job that has waited longer than ``max_queue_s`` when the model thread reaches it, or
whose caller gave up (timeout, client gone), is never started on the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serve import metrics
from serve.classifier import OnnxClassifier, softmax
from serve.contract import VariantRecord

logger = logging.getLogger("trimserve.batching")


@dataclass
class Engine:
    """What the service loads at start and the gate serves from (one per worker process)."""

    classifier: OnnxClassifier | None = None
    batcher: Batcher | None = None
    ready: bool = False  # True once warmed up


class Overdue(Exception):
    """The job waited in the queue past ``max_queue_s``: the server is over capacity."""


@dataclass(eq=False)
class Job:
    """Texts of one request, tokenized; ``future`` gets float32 probabilities [texts, labels]."""

    encodings: list  # tokenizers.Encoding, truncated, not padded
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # set by the caller when it no longer waits (timeout, client gone)

    @property
    def texts(self) -> int:
        return len(self.encodings)


class Batcher:
    """The model thread and its queue.

    Args:
        model: the classifier; only its ``pad`` and ``session`` are used here.
        max_batch_size: texts per model call at most.
        max_batch_tokens: padded tokens per model call at most (texts x longest text).
        max_queue_s: a job queued longer than this when its turn comes gets ``Overdue``.
        merge: False runs one request per model call (no batching across requests).
        max_padding: a model call's padding tokens at most this share of its real tokens.  Padding
            costs like real tokens: measured on pruned-int8 (one ONNX Runtime thread, test sentences
            of 28 tokens on average), batches in arrival order pad by 1.4-1.9x and run 30-85 % slower
            per sentence than one at a time, length-sorted ones 5-7 % faster.
    """

    def __init__(
        self,
        model: OnnxClassifier,
        max_batch_size: int,
        max_batch_tokens: int,
        max_queue_s: float,
        merge: bool = True,
        max_padding: float = 0.1,
    ):
        self.model = model
        self.merge = merge
        self.max_padding = max_padding
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_s = max_queue_s
        self.queue: deque[Job] = deque()
        self.busy = False  # a round is being run
        self.ready = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="trimserve-model", daemon=True)
        self.thread.start()

    def submit(self, encodings: list, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue one request's encodings; await ``job.future`` for its probabilities."""
        job = Job(encodings, loop.create_future())
        with self.ready:
            self.queue.append(job)
            self.ready.notify()
        return job

    def _take(self) -> list[Job]:
        """Block until work is queued, then take the jobs that fit one round of model calls."""
        with self.ready:
            self.busy = False
            while not self.queue:
                self.ready.wait()
            self.busy = True
            taken = [self.queue.popleft()]
            texts = taken[0].texts
            # A request's texts are never split across rounds; besides the first request, a round
            # takes what fits one full batch.
            while self.merge and self.queue and texts + self.queue[0].texts <= max(self.max_batch_size, taken[0].texts):
                job = self.queue.popleft()
                taken.append(job)
                texts += job.texts
            return taken

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # name the thread for top -H, py-spy and perf.loadgen's CPU split
            Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text("trimserve-model")
        while True:
            jobs = self._take()
            now = time.perf_counter()
            outcomes: list[tuple[Job, object]] = []
            live = []
            for job in jobs:
                if job.abandoned:
                    continue
                if now - job.queued > self.max_queue_s:
                    outcomes.append((job, Overdue()))
                    continue
                metrics.QUEUE_SECONDS.observe(now - job.queued)
                live.append(job)
            if live:
                try:
                    outcomes += zip(live, self._infer(live), strict=True)
                except Exception as err:  # a bug or a broken model: every waiting request gets a 500
                    logger.exception("model call failed")
                    outcomes += [(job, err) for job in live]
            if outcomes:  # one wake-up of the event loop per round, not per job
                outcomes[0][0].future.get_loop().call_soon_threadsafe(_deliver, outcomes)

    def _infer(self, jobs: list[Job]) -> list[np.ndarray]:
        """Run the jobs' texts in length-sorted model calls within the limits; probabilities per job."""
        flat = [(j, i, e) for j, job in enumerate(jobs) for i, e in enumerate(job.encodings)]
        flat.sort(key=lambda item: len(item[2].ids))
        probs = [np.empty((job.texts, len(self.model.labels)), dtype=np.float32) for job in jobs]
        for start, end in chunk_bounds(
            [len(e.ids) for _, _, e in flat], self.max_batch_size, self.max_batch_tokens, self.max_padding
        ):
            chunk = flat[start:end]
            began = time.perf_counter()
            encoded = self.model.pad([e for _, _, e in chunk])
            chunk_probs = softmax(self.model.logits(encoded))
            metrics.record_batch(len(chunk), time.perf_counter() - began)
            for (j, i, _), row in zip(chunk, chunk_probs, strict=True):
                probs[j][i] = row
        return probs


def may_share_calls(record: VariantRecord) -> tuple[bool, str]:
    """Whether the variant's texts may share model calls, and why, for the start-up log.

    A variant whose answers move with their batch (export/ measured ``batch_invariance``:
    dynamic int8 computes its activation scales over the whole call) is run one text per
    model call, so a request's answer never depends on concurrent traffic.  A record without
    the measurement (an older export) keeps batching, and the reason says it was not measured.
    """
    inv = record.batch_invariance
    if inv is None:
        return True, "batch invariance not measured (exported before trimserve recorded it)"
    if not inv["invariant"]:
        return False, f"not batch-invariant (max |dprob| {inv['max_abs_prob_diff']:.2g}): one text per model call"
    return True, f"batch-invariant (max |dprob| {inv['max_abs_prob_diff']:.2g})"


def chunk_bounds(
    lengths: list[int], max_batch_size: int, max_batch_tokens: int, max_padding: float
) -> list[tuple[int, int]]:
    """Split texts sorted by token count into model calls: ``[(start, end), ...]`` covering them in order.

    A call grows while it stays within ``max_batch_size`` texts, ``max_batch_tokens`` padded
    tokens (texts x its longest) and padding of at most ``max_padding`` x its real tokens; a
    text too long for ``max_batch_tokens`` on its own still gets a call of its own.

    Raises:
        ValueError: ``lengths`` is not sorted ascending.
    """
    if any(a > b for a, b in itertools.pairwise(lengths)):
        raise ValueError("lengths must be sorted ascending")
    bounds = []
    start = 0
    while start < len(lengths):
        end, real = start + 1, lengths[start]
        while end < len(lengths) and end - start < max_batch_size:
            longest = lengths[end]  # sorted: the newcomer is the longest, the one all pad to
            padded = (end - start + 1) * longest
            if padded > max_batch_tokens or padded > (1 + max_padding) * (real + longest):
                break
            end, real = end + 1, real + longest
        bounds.append((start, end))
        start = end
    return bounds


def _deliver(outcomes: list[tuple[Job, object]]) -> None:
    """On the event loop: each job's probabilities, or the exception it ended with."""
    for job, outcome in outcomes:
        if job.future.done():  # the caller timed out or left meanwhile
            continue
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
