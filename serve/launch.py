"""Run ``bentoml serve`` of this service as a child process: for load tests, soak runs and tests.

    with ServerProcess({"TRIMSERVE_API_KEYS_FILE": "keys"}, log="server.log") as server:
        server.wait_ready()
        httpx.post(f"{server.url}/classify", ...)

The server gets a free loopback port, its own ``BENTOML_HOME`` (BentoML wipes the metrics
directory under it at start, so two servers must not share one) and its own process group,
so stopping it reaches the arbiter and its workers.  ``TRIMSERVE_*`` variables of the
calling process are not inherited: the server sees exactly the settings it is given.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serve.contract import UserError

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``bentoml serve serve.service:Classifier`` on 127.0.0.1:<free port>, output to ``log``.

    ``cpus`` pins the server (arbiter and workers) to those cores, so a load generator on the
    other cores does not take the server's CPU time.
    """

    def __init__(
        self,
        env: dict[str, str],
        log: str | Path,
        working_dir: str | Path = REPO,
        home: str | Path | None = None,
        args: tuple[str, ...] = (),
        cpus: tuple[int, ...] = (),
    ):
        self.log = Path(log)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._home = None if home else tempfile.TemporaryDirectory(prefix="bentoml-home-")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRIMSERVE_")}
        full_env.update(BENTOML_HOME=str(home or self._home.name), BENTOML_DO_NOT_TRACK="True", **env)
        with self.log.open("wb") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bentoml",
                    "serve",
                    "serve.service:Classifier",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--working-dir",
                    str(working_dir),
                    *args,
                ],
                cwd=working_dir,
                env=full_env,
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT,
                # the workers inherit it: the whole server stays on these cores
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        self.pid = self.process.pid

    def wait_ready(self, timeout_s: float = 180) -> float:
        """Seconds until /readyz answered 200; UserError with the log's last line if it exits or times out."""
        start = time.monotonic()
        while self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):  # not bound yet, or loading: /readyz hangs meanwhile
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise UserError(f"bentoml serve not ready after {timeout_s:.0f} s; its log ends: {self.last_line()}")
            time.sleep(0.2)
        raise UserError(f"bentoml serve exited at start ({self.process.returncode}): {self.last_line()}")

    def workers(self) -> list[int]:
        """Pids of the worker processes (the arbiter's children)."""
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        return []

    def terminate(self) -> None:
        """SIGTERM to the arbiter only, as a container runtime sends it to PID 1; it stops the workers."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 5) -> int:
        """SIGTERM to the whole process group; SIGKILL after ``timeout_s``. Returns the exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        if self._home is not None:
            self._home.cleanup()
            self._home = None
        return self.process.returncode

    def last_line(self) -> str:
        """The service's own start-up error if there is one, else the log's last non-blank line."""
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        trimserve = [line for line in lines if line.startswith("trimserve:")]
        return (trimserve or lines or ["(empty log)"])[-1].strip()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
