"""Backhaul benchmark: one run, on loopback, three paths to the same sample API backend.

    .venv/bin/python bench/run.py [--quick] [--only direct,ssh,backhaul] [--all]

Paths:
  direct    the caller talks HTTP/1.1 to the sample API
  ssh       the same through an `ssh -R` reverse tunnel (a private sshd started for the run)
  backhaul  the same through a Backhaul relay and agent (HTTPS to the relay, TLS WebSocket tunnel)

Per path: small-request throughput (wrk, 64 keep-alive connections; three runs per path and
five transfers each way, the paths taking turns, the median reported), single-client latency
(p50/p99 of sequential GETs on one keep-alive connection), 256 MiB download and upload speed,
requests/s at 1, 4, 16 and 64 concurrent clients (also drawn as bench/requests-per-second.png
when matplotlib is installed: pip install -e '.[bench]'), small-request latency while a 1 GiB
download runs on the same path, and for Backhaul the relay's and the agent's resident memory.
Writes a Markdown report (bench/RESULTS.md by default; bench/out/ for --quick). With --all,
then runs bench/winauth.py, bench/cluster.py and bench/scale.py. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backhaul import sampleapi  # noqa: E402
from backhaul.devstack import command, free_port  # noqa: E402

PATHS = ("direct", "ssh", "backhaul")
#: Backhaul again, the caller on the relay's plain-HTTP local listener (``local_listen``)
#: instead of its public TLS one: measured beside the three paths, reported on its own.
LOCAL = "backhaul-local"
LABELS = {
    "direct": "direct",
    "ssh": "ssh -R",
    "backhaul": "Backhaul",
    LOCAL: "Backhaul, local port",
}
MiB = 1024 * 1024
GiB = 1024 * MiB
SSHD = "/usr/sbin/sshd"
CHART = "requests-per-second.png"


@dataclass(frozen=True)
class Settings:
    wrk_seconds: int
    wrk_connections: int
    wrk_threads: int
    latency_samples: int
    latency_warmup: int
    transfer_bytes: int
    quick: bool
    sweep_levels: tuple[int, ...] = (1, 4, 16, 64)  # concurrent keep-alive clients
    sweep_seconds: int = 4
    fairness_samples: int = 500
    fairness_bytes: int = GiB
    fairness_time_limit: float = 120.0
    #: Each path's transfers are measured this many times, the paths taking turns, and the
    #: median is reported: a single transfer moves ±20 % between runs minutes apart, and
    #: within one run of three a path's rounds were up to 1.17x apart (``ssh -R``'s downloads
    #: at 13:12 on 2026-12-06: 554.8 / 473.1 / 542.3 MiB/s), so five, at about a second each.
    transfer_rounds: int = 5
    #: The same for the 64-client small requests: one run per path, minutes apart, once put
    #: ``ssh -R`` at 7,275 req/s in the main row and 9,707 in the sweep a minute later.
    wrk_rounds: int = 3


FULL = Settings(10, 64, 2, 2000, 200, 256 * MiB, False)
QUICK = Settings(
    3,
    64,
    2,
    300,
    50,
    32 * MiB,
    True,
    sweep_seconds=1,
    fairness_samples=200,
    fairness_bytes=256 * MiB,
    fairness_time_limit=30.0,
    transfer_rounds=1,
    wrk_rounds=1,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Processes: everything started here is stopped at exit, whatever happens.


class Processes:
    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], logfile: Path, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        log(f"start {name}: {shlex.join(redact(argv))}")
        with logfile.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as a whole
                **kwargs,
            )
        self.started.append((name, proc))
        return proc

    def adopt(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.started.append((name, proc))

    def stop_all(self) -> None:
        # Last started first: the ssh client before sshd, the agent before the relay.
        for name, proc in reversed(self.started):
            stop_process(name, proc)
        self.started.clear()


def descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def stop_process(name: str, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    pids = [proc.pid, *descendants(proc.pid)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for pid in pids[1:]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log(f"{name} did not stop on SIGTERM; killing it")
    for pid in pids[1:]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)


def save_logs(tmp: Path, dest: Path) -> None:
    """Copy the run's log files (never its keys) somewhere that outlives the temp dir."""
    logs = sorted(tmp.rglob("*.log"))
    if not logs:
        return
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for path in logs:
        shutil.copy(path, dest / path.name)
    log(f"logs copied to {dest}")


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------------------
# Small helpers


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.1)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def redact(argv: list[str]) -> list[str]:
    """The argv for a log line: token values and Authorization headers hidden."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--token":
            out.append("…")
        elif arg.lower().startswith("authorization:"):
            out.append("Authorization: …")
        else:
            out.append(arg)
    return out


def run_cmd(argv: list[str], timeout: float, what: str) -> str:
    log(f"run: {shlex.join(redact(argv))}")
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if r.returncode != 0:
        output = (r.stdout + "\n" + r.stderr).strip()
        log(f"{what} output:\n{output}")
        last = output.splitlines()[-1] if output else "no output"
        raise RuntimeError(f"{what} failed with status {r.returncode}: {last}")
    return r.stdout


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def tree_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM summed over a process and its descendants (KiB)."""
    total = {"VmRSS": 0, "VmHWM": 0}
    for p in [pid, *descendants(pid)]:
        st = proc_status(p)
        for key in total:
            total[key] += st.get(key, 0)
    return total


_TICK = os.sysconf("SC_CLK_TCK")


def stat_cpu(stat: Path) -> float:
    """CPU seconds (user + system) from a /proc ``stat`` file of a process or thread; 0 if
    it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its descendants."""
    return sum(stat_cpu(Path(f"/proc/{p}/stat")) for p in [pid, *descendants(pid)])


def proc_io(pid: int) -> tuple[int, int] | None:
    """Bytes a process has read and written so far (``rchar``, ``wchar`` of /proc/<pid>/io:
    sockets included, what the system calls moved); None if it is gone."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines()
        )
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def tree_io(pid: int) -> tuple[int, int]:
    """:func:`proc_io` of a process and its descendants, summed."""
    found = [io for p in [pid, *descendants(pid)] if (io := proc_io(p)) is not None]
    return sum(io[0] for io in found), sum(io[1] for io in found)


class MemorySampler:
    """Samples VmRSS of some process trees every 50 ms; keeps the maximum."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], tree_status(pid)["VmRSS"])
            self._stop.wait(0.05)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------
# A path under test and the measurements


@dataclass
class Target:
    name: str
    base: str  # URL prefix: base + "/small" is the small endpoint
    headers: dict[str, str] = field(default_factory=dict)
    ca_file: Path | None = None
    memory_pids: dict[str, int] = field(default_factory=dict)
    #: The path's own processes (and the backend, added by main), for the CPU budget.
    cpu_pids: dict[str, int] = field(default_factory=dict)
    #: Backhaul's invoke URL on the relay's local listener, in plain HTTP.
    local_base: str | None = None

    def client(self, **kwargs: Any) -> httpx.Client:
        verify: ssl.SSLContext | bool = True
        if self.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.ca_file))
        timeout = httpx.Timeout(60.0, connect=10.0)
        return httpx.Client(headers=self.headers, verify=verify, timeout=timeout, **kwargs)


@dataclass
class Result:
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    #: Every run of a measurement taken several times (wrk at 64 clients, the transfers),
    #: in order.
    runs: dict[str, list[float]] = field(default_factory=dict)


def check_target(target: Target) -> None:
    with target.client() as c:
        r = c.get(target.base + "/small")
        if r.status_code != 200 or len(r.content) != sampleapi.SMALL_SIZE:
            raise RuntimeError(
                f"{target.name}: GET /small answered {r.status_code} with {len(r.content)} bytes:"
                f" {r.text[:300]}"
            )
        r = c.get(target.base + "/echo/check", params={"q": "1"})
        if r.status_code != 200 or r.json().get("query") != "q=1":
            raise RuntimeError(f"{target.name}: GET /echo answered {r.status_code}: {r.text[:300]}")


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def run_wrk(target: Target, connections: int, threads: int, seconds: int) -> str:
    """One wrk run against base/small; its standard output."""
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
    ]
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(target.base + "/small")
    log(f"{target.name}: {shlex.join(redact(argv))}")
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 60, stdin=subprocess.DEVNULL
    )
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout}\n{r.stderr}")
    return r.stdout


def wrk_rate(out: str) -> tuple[float, int]:
    """Requests/sec and the number of requests from wrk's output."""
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"^\s*(\d+) requests in", out, re.MULTILINE)
    if not m or not total:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return float(m.group(1)), int(total.group(1))


def wrk_percentiles(out: str) -> dict[str, float]:
    """p50 and p99 from wrk's ``--latency`` distribution, in ms (those it printed)."""
    found = {}
    for pct in ("50", "99"):
        pm = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.MULTILINE)
        if pm:
            found[pct] = _ms(pm.group(1))
    return found


def wrk_problems(out: str) -> list[str]:
    notes = []
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        notes.append(f"{non2xx.group(1)} non-2xx responses")
    errors = re.search(r"Socket errors:(.*)", out)
    if errors:
        notes.append(f"socket errors:{errors.group(1)}")
    return notes


def children_cpu() -> float:
    """CPU seconds used so far by this process's finished (waited-for) children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_wrk(target: Target, s: Settings, result: Result) -> None:
    """wrk at 64 clients, and the CPU time every process on the path spent per request:
    wrk itself, the path's own processes and the backend."""
    pids = {**target.memory_pids, **target.cpu_pids}
    cpu_before = {name: tree_cpu(pid) for name, pid in pids.items()}
    io_before = {name: tree_io(pid) for name, pid in pids.items()}
    wrk_before = children_cpu()
    out = run_wrk(target, s.wrk_connections, s.wrk_threads, s.wrk_seconds)
    wrk_used = children_cpu() - wrk_before
    result.values["rps"], requests = wrk_rate(out)
    if requests:
        for name, pid in pids.items():
            used = tree_cpu(pid) - cpu_before[name]
            result.values[f"{name}_cpu_per_request"] = used / requests * 1000
            read, written = tree_io(pid)
            result.values[f"{name}_read_per_request"] = (read - io_before[name][0]) / requests
            result.values[f"{name}_written_per_request"] = (written - io_before[name][1]) / requests
        result.values["wrk_cpu_per_request"] = wrk_used / requests * 1000
    for pct, ms in wrk_percentiles(out).items():
        result.values[f"wrk_p{pct}"] = ms
    result.notes += [f"wrk: {problem}" for problem in wrk_problems(out)]


def measure_small_requests(
    targets: dict[str, Target], results: dict[str, Result], s: Settings
) -> None:
    """:func:`measure_wrk` and :func:`measure_one_client`, ``s.wrk_rounds`` times, the paths
    taking turns as the transfers do; each figure of a path is the median of its rounds, and
    the rounds' requests/s and one-client p50s are kept for the report."""
    rounds: dict[str, list[dict[str, float]]] = {path: [] for path in targets}
    for round_ in range(s.wrk_rounds):
        for path, target in targets.items():
            one = Result()
            try:
                measure_wrk(target, s, one)
            except Exception as exc:
                log(f"{target.name}: wrk failed: {exc}")
                results[path].notes.append(f"wrk: {exc}")
                continue
            log(f"{target.name}: wrk -c{s.wrk_connections}: {one.values.get('rps', 0):,.0f} req/s")
            try:
                measure_one_client(target, s, one)
            except Exception as exc:
                log(f"{target.name}: wrk -c1 failed: {exc}")
                one.notes.append(f"wrk -c1: {exc}")
            results[path].notes += one.notes
            rounds[path].append(one.values)
        log(f"small requests round {round_ + 1} of {s.wrk_rounds}")
    for path, measured in rounds.items():
        result = results[path]
        result.runs["rps"] = [values["rps"] for values in measured if "rps" in values]
        result.runs["wrk1_p50"] = [v["wrk1_p50"] for v in measured if "wrk1_p50" in v]
        for key in sorted({key for values in measured for key in values}):
            found = [values[key] for values in measured if key in values]
            result.values[key] = statistics.median(found)


def measure_one_client(target: Target, s: Settings, result: Result) -> None:
    """wrk at one client (``wrk1_p50``, ``wrk1_p99``): taken in the rounds of
    :func:`measure_small_requests`, the paths taking turns, because a slow spell of a shared
    machine that falls on one path's single run moves its p50 by more than the code does."""
    out = run_wrk(target, 1, 1, s.sweep_seconds)
    for pct, ms in wrk_percentiles(out).items():
        result.values[f"wrk1_p{pct}"] = ms
    result.notes += [f"wrk -c1: {problem}" for problem in wrk_problems(out)]


def measure_sweep(target: Target, s: Settings, result: Result) -> None:
    """Small requests/s at each concurrency level: wrk -cN -t min(N, 2)."""
    for n in s.sweep_levels:
        try:
            out = run_wrk(target, n, min(n, 2), s.sweep_seconds)
            result.values[f"sweep_{n}"], _ = wrk_rate(out)
            if n == 1:  # one client again, timed by a client in C (bench/README.md)
                for pct, ms in wrk_percentiles(out).items():
                    result.values[f"wrk1_p{pct}"] = ms
        except Exception as exc:
            result.notes.append(f"sweep -c{n}: {exc}")
            continue
        result.notes += [f"sweep -c{n}: {problem}" for problem in wrk_problems(out)]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def measure_latency(target: Target, s: Settings, result: Result) -> None:
    log(f"{target.name}: latency, 1 client, {s.latency_samples} sequential GET /small")
    url = target.base + "/small"
    samples: list[float] = []
    deadline = time.monotonic() + 300
    with target.client() as c:
        for _ in range(s.latency_warmup):
            c.get(url).raise_for_status()
        for _ in range(s.latency_samples):
            t0 = time.perf_counter_ns()
            r = c.get(url)
            t1 = time.perf_counter_ns()
            if r.status_code != 200 or len(r.content) != sampleapi.SMALL_SIZE:
                raise RuntimeError(f"GET /small answered {r.status_code}")
            samples.append((t1 - t0) / 1e6)
            if time.monotonic() > deadline:
                result.notes.append(f"latency: stopped after {len(samples)} samples (time limit)")
                break
    samples.sort()
    result.values["p50"] = percentile(samples, 50)
    result.values["p99"] = percentile(samples, 99)
    result.values["mean"] = sum(samples) / len(samples)


TRANSFER_LIMIT_S = 600.0


def curl_argv(target: Target) -> list[str]:
    """curl with the path's trust anchor and headers (the bearer token for Backhaul)."""
    argv = ["curl", "--silent", "--show-error", "--fail", "--http1.1"]
    if target.ca_file is not None:
        argv += ["--cacert", str(target.ca_file)]
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    return argv


def curl_rate(out: str, n: int, what: str) -> float:
    """MiB/s from curl's ``--write-out "%{size_…} %{time_pretransfer} %{time_total}"``:
    the body's bytes over the time after the connection (and TLS) was set up."""
    size, before, total = out.split()
    if int(size) != n:
        raise RuntimeError(f"{what}: curl moved {size} bytes, expected {n}")
    return n / MiB / (float(total) - float(before))


def download_argv(target: Target, n: int) -> list[str]:
    """curl downloading ``n`` bytes; it prints what :func:`curl_rate` reads."""
    return [
        *curl_argv(target),
        *("--output", "/dev/null"),
        *("--write-out", "%{size_download} %{time_pretransfer} %{time_total}"),
        f"{target.base}/bytes/{n}",
    ]


def upload_argv(target: Target, body: Path, answer: str) -> list[str]:
    """curl uploading the file ``body``, the API's answer written to ``answer``; it prints
    what :func:`curl_rate` reads."""
    return [
        *curl_argv(target),
        *("-X", "POST", "--upload-file", str(body)),
        *("-H", "Content-Type: application/octet-stream"),
        *("-H", "Expect:"),  # no 100-continue round trip: every path sends the body at once
        *("--output", answer),
        *("--write-out", "%{size_upload} %{time_pretransfer} %{time_total}"),
        f"{target.base}/upload",
    ]


def measure_download(target: Target, s: Settings, result: Result) -> None:
    n = s.transfer_bytes
    log(f"{target.name}: download {n // MiB} MiB with curl")
    argv = download_argv(target, n)
    sampler = MemorySampler(target.memory_pids)
    with sampler:
        out = run_cmd(argv, TRANSFER_LIMIT_S, "download")
    result.values["download"] = curl_rate(out, n, "download")
    for name, peak in sampler.peak.items():
        result.values[f"{name}_rss_download"] = peak / 1024


def upload_file(n: int) -> Path:
    """The upload's body on disk (pattern bytes), written once per run."""
    path = Path(tempfile.gettempdir()) / f"backhaul-bench-upload-{os.getpid()}-{n}.bin"
    if not path.exists() or path.stat().st_size != n:
        block = sampleapi.pattern_bytes(MiB)
        with path.open("wb") as out:
            left = n
            while left > 0:
                piece = block[: min(left, MiB)]
                out.write(piece)
                left -= len(piece)
    return path


def measure_upload(target: Target, s: Settings, result: Result) -> None:
    n = s.transfer_bytes
    log(f"{target.name}: upload {n // MiB} MiB with curl")
    body = upload_file(n)
    answer = body.with_suffix(f".{target.name}.json")
    argv = upload_argv(target, body, str(answer))
    sampler = MemorySampler(target.memory_pids)
    try:
        with sampler:
            out = run_cmd(argv, TRANSFER_LIMIT_S, "upload")
        reported = json.loads(answer.read_text()).get("bytes")
    finally:
        answer.unlink(missing_ok=True)
    if reported != n:
        raise RuntimeError(f"upload: the backend received {reported} bytes, expected {n}")
    result.values["upload"] = curl_rate(out, n, "upload")
    for name, peak in sampler.peak.items():
        result.values[f"{name}_rss_upload"] = peak / 1024


def small_get(client: httpx.Client, url: str) -> float:
    """One GET /small on a kept-alive client; its duration in ms."""
    t0 = time.perf_counter_ns()
    r = client.get(url)
    t1 = time.perf_counter_ns()
    if r.status_code != 200 or len(r.content) != sampleapi.SMALL_SIZE:
        raise RuntimeError(f"GET /small answered {r.status_code}: {r.text[:300]}")
    return (t1 - t0) / 1e6


def bytes_written(pid: int) -> int:
    """Bytes a process has written so far (wchar of /proc/<pid>/io), or -1 if unknown.
    For curl that is the response body it has received (recv() is not counted in rchar)."""
    io = proc_io(pid)
    return io[1] if io is not None else -1


class Download:
    """One large download by curl, in its own process, so that it competes with the small
    requests on the path (the tunnel) and not for this process's interpreter lock."""

    def __init__(self, target: Target, size: int, procs: Processes, logfile: Path) -> None:
        argv = [
            *curl_argv(target),
            *("--output", "/dev/null"),
            *("--write-out", "%{size_download} %{time_total}\\n"),  # curl turns \n into a newline
            f"{target.base}/bytes/{size}",
        ]
        self.size, self.logfile = size, logfile
        self.proc = procs.start("curl download", argv, logfile)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Return once the response body is flowing (curl has written a few MiB of it)."""
        started = time.monotonic()
        while True:
            if not self.running():
                raise RuntimeError(f"curl exited early: {tail(self.logfile, 5)}")
            got = bytes_written(self.proc.pid)
            if got >= 4 * MiB or (got < 0 and time.monotonic() - started > 1.0):
                return
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"the download did not start within {timeout:.0f} s")
            time.sleep(0.005)

    def finish(self, timeout: float) -> float:
        """Wait for the end, check the byte count; the transfer's duration in seconds."""
        status = self.proc.wait(timeout)
        lines = tail(self.logfile, 5).splitlines()
        if status != 0 or not lines:
            raise RuntimeError(f"curl failed with status {status}: {' '.join(lines)}")
        size, seconds = lines[-1].split()
        if int(size) != self.size:
            raise RuntimeError(f"download: got {size} bytes, expected {self.size}")
        return float(seconds)

    def stop(self) -> None:
        stop_process("curl download", self.proc)


def measure_fairness(
    target: Target, s: Settings, result: Result, procs: Processes, tmp: Path
) -> None:
    """Small-request latency on an idle path, then while one large download runs on it."""
    if shutil.which("curl") is None:
        raise RuntimeError("curl not found: run `bash bench/setup.sh`")
    url = target.base + "/small"
    n, count = s.fairness_bytes, s.fairness_samples
    log(f"{target.name}: fairness, {count} sequential GET /small idle, then during a download")
    logfile = tmp / f"curl-{target.name}.log"
    loaded: list[float] = []
    seconds: list[float] = []
    download: Download | None = None
    with target.client() as c:
        for _ in range(s.latency_warmup):
            small_get(c, url)
        idle = sorted(small_get(c, url) for _ in range(count))
        result.values["fair_idle_p50"] = percentile(idle, 50)
        result.values["fair_idle_p99"] = percentile(idle, 99)
        deadline = time.monotonic() + s.fairness_time_limit
        try:
            while len(loaded) < count and time.monotonic() < deadline:
                if download is None:
                    log(f"{target.name}: download {n // MiB} MiB with curl")
                    download = Download(target, n, procs, logfile)
                    download.wait_streaming()
                took = small_get(c, url)
                if download.running():
                    loaded.append(took)  # started and ended while the download ran
                else:
                    seconds.append(download.finish(TRANSFER_LIMIT_S))
                    download = None
                    log(f"{target.name}: download ended after {len(loaded)} samples")
            if download is not None:
                seconds.append(download.finish(TRANSFER_LIMIT_S))
                download = None
        finally:
            if download is not None:
                download.stop()
    if not loaded:
        raise RuntimeError("no small request completed while the download ran")
    loaded.sort()
    result.values["fair_load_p50"] = percentile(loaded, 50)
    result.values["fair_load_p99"] = percentile(loaded, 99)
    result.values["fair_samples"] = len(loaded)
    result.values["fair_downloads"] = len(seconds)
    if seconds:
        result.values["fair_download"] = len(seconds) * n / MiB / sum(seconds)
    if len(loaded) < count:
        result.notes.append(
            f"fairness: {len(loaded)} of {count} small requests during the download (time limit)"
        )


def measure_transfers(targets: dict[str, Target], results: dict[str, Result], s: Settings) -> None:
    """The download and the upload, ``s.transfer_rounds`` times, the paths taking turns
    (direct, ssh -R, Backhaul, direct, …) so that a slow minute of the machine weighs on all
    of them; each path reports the median, its runs are kept for the report."""
    broken: set[tuple[str, str]] = set()
    for path, target in targets.items():  # what the transfers' peaks are to be read against
        for name, pid in target.memory_pids.items():
            results[path].values[f"{name}_rss_transfers"] = tree_status(pid)["VmRSS"] / 1024
    for round_ in range(s.transfer_rounds):
        for path, target in targets.items():
            result = results[path]
            for kind, step in (("download", measure_download), ("upload", measure_upload)):
                if (path, kind) in broken:
                    continue
                one = Result()
                try:
                    step(target, s, one)
                except Exception as exc:
                    log(f"{target.name}: {kind} failed: {exc}")
                    result.notes.append(f"{kind}: {exc}")
                    broken.add((path, kind))
                    continue
                result.runs.setdefault(kind, []).append(one.values.pop(kind))
                for key, peak in one.values.items():  # the memory peaks: the largest
                    result.values[key] = max(peak, result.values.get(key, 0.0))
            log(f"{target.name}: transfers round {round_ + 1} of {s.transfer_rounds}")
    for path, target in targets.items():
        result = results[path]
        for kind, runs in result.runs.items():
            result.values[kind] = statistics.median(runs)
        # The transfers are the last measurement: the memory the run leaves is read now.
        for name, pid in target.memory_pids.items():
            st = tree_status(pid)
            result.values[f"{name}_rss_end"] = st["VmRSS"] / 1024
            result.values[f"{name}_hwm"] = st["VmHWM"] / 1024


def measure(target: Target, s: Settings, procs: Processes, tmp: Path) -> Result:
    result = Result()
    check_target(target)
    for name, pid in target.memory_pids.items():
        result.values[f"{name}_rss_idle"] = tree_status(pid)["VmRSS"] / 1024

    def fairness(target: Target, s: Settings, result: Result) -> None:
        measure_fairness(target, s, result, procs, tmp)

    steps: list[tuple[str, Callable[[Target, Settings, Result], None]]] = [
        ("latency", measure_latency),
        ("sweep", measure_sweep),
        ("fairness", fairness),
    ]
    for name, step in steps:
        try:
            step(target, s, result)
        except Exception as exc:
            log(f"{target.name}: {name} failed: {exc}")
            result.notes.append(f"{name}: {exc}")
    return result


# --------------------------------------------------------------------------------------
# The three paths


def setup_direct(backend_port: int, **_: Any) -> Target:
    return Target("direct", f"http://127.0.0.1:{backend_port}")


def setup_ssh(backend_port: int, procs: Processes, tmp: Path, **_: Any) -> Target:
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: run `bash bench/setup.sh`")
    if not Path(SSHD).exists():
        raise RuntimeError(f"{SSHD} not found: run `bash bench/setup.sh`")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    d = tmp / "ssh"
    d.mkdir()
    host_key, client_key = d / "host_ed25519", d / "client_ed25519"
    for key in (host_key, client_key):
        run_cmd(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], 30, "ssh-keygen")
    authorized = d / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    authorized.chmod(0o600)
    sshd_port, tunnel_port = free_port(), free_port()
    config = d / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {sshd_port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {d / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "UsePAM no",
                "StrictModes no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "AllowTcpForwarding yes",
                "GatewayPorts no",
                "X11Forwarding no",
                "PrintMotd no",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    sshd_log = d / "sshd.log"
    sshd = procs.start("sshd", [SSHD, "-D", "-e", "-f", str(config)], sshd_log)
    try:
        wait_for("sshd", lambda: port_open(sshd_port), 20, sshd)
    except Exception as exc:
        raise RuntimeError(f"{exc}\n{tail(sshd_log)}") from exc
    ssh_log = d / "ssh.log"
    ssh = procs.start(
        "ssh -R",
        [
            "ssh",
            "-N",
            "-F",
            "/dev/null",
            "-R",
            f"127.0.0.1:{tunnel_port}:127.0.0.1:{backend_port}",
            "-p",
            str(sshd_port),
            "-i",
            str(client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
            f"{getpass.getuser()}@127.0.0.1",
        ],
        ssh_log,
    )
    try:
        wait_for("ssh -R tunnel", lambda: port_open(tunnel_port), 30, ssh)
    except Exception as exc:
        raise RuntimeError(f"{exc}\nssh: {tail(ssh_log)}\nsshd: {tail(sshd_log)}") from exc
    return Target(
        "ssh", f"http://127.0.0.1:{tunnel_port}", cpu_pids={"sshd": sshd.pid, "ssh": ssh.pid}
    )


def setup_backhaul(
    backend_port: int,
    procs: Processes,
    tmp: Path,
    relay_args: tuple[str, ...] = (),
    local: bool = False,
    **_: Any,
) -> Target:
    """The relay and an enrolled agent; with ``local``, the relay also has a local listener
    (``local_base``). Off by default, so that a tree from before it existed still starts
    (``bench/pairs.py`` and ``bench/transfer_cpu.py --against``)."""
    relay_bin, agent_bin = command("backhaul-relay"), command("backhaul-agent")
    data, agent_dir = tmp / "relay-data", tmp / "agent"
    port, local_port = free_port(), free_port()
    relay_url = f"https://127.0.0.1:{port}"
    ca_file = data / "tls" / "relay.crt"
    relay_log = tmp / "relay.log"
    relay = procs.start(
        "relay",
        [
            *(relay_bin, "serve", "--dev", "--data-dir", str(data)),
            *("--listen", f"127.0.0.1:{port}"),
            *(("--local-listen", f"127.0.0.1:{local_port}") if local else ()),
            *relay_args,
        ],
        relay_log,
    )

    def relay_up() -> bool:
        if not ca_file.exists():
            return False
        ctx = ssl.create_default_context(cafile=str(ca_file))
        return httpx.get(relay_url + "/healthz", verify=ctx, timeout=2).status_code == 200

    try:
        wait_for("relay", relay_up, 60, relay)
    except Exception as exc:
        raise RuntimeError(f"{exc}\n{tail(relay_log)}") from exc

    token_out = run_cmd(
        [relay_bin, "create-admin", "bench", "--data-dir", str(data)], 60, "create-admin"
    )
    lines = [line.strip() for line in token_out.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError("create-admin printed no token")
    token = lines[-1]
    auth = {"Authorization": f"Bearer {token}"}
    api = httpx.Client(
        base_url=relay_url,
        headers=auth,
        verify=ssl.create_default_context(cafile=str(ca_file)),
        timeout=30,
    )

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = api.post(path, json=body)
        if r.status_code not in (200, 201):
            raise RuntimeError(f"POST {path} answered {r.status_code}: {r.text[:500]}")
        data_: dict[str, Any] = r.json()
        return data_

    with api:
        gateway = post("/v1/gateways", {"name": "bench"})
        backend = f"http://127.0.0.1:{backend_port}/"
        run_cmd(
            [
                agent_bin,
                "enroll",
                "--relay",
                relay_url,
                "--token",
                gateway["enrollment_token"],
                "--ca-file",
                str(ca_file),
                "--config-dir",
                str(agent_dir),
                "--allow",
                backend,
            ],
            120,
            "backhaul-agent enroll",
        )
        agent_log = tmp / "agent.log"
        agent = procs.start("agent", [agent_bin, "run", "--config-dir", str(agent_dir)], agent_log)

        def agent_connected() -> bool:
            r = subprocess.run(
                [agent_bin, "status", "--config-dir", str(agent_dir), "--json"],
                capture_output=True,
                text=True,
                timeout=15,
                stdin=subprocess.DEVNULL,
            )
            # The exit status may say "not connected"; the JSON is what counts.
            return bool(json.loads(r.stdout).get("connected") is True)

        try:
            wait_for("agent connected", agent_connected, 60, agent)
        except Exception as exc:
            raise RuntimeError(
                f"{exc}\nagent: {tail(agent_log)}\nrelay: {tail(relay_log)}"
            ) from exc
        connector = post(
            "/v1/connectors",
            {
                "name": "bench",
                "base_url": backend,
                "auth_type": "none",
                "gateway_id": gateway["id"],
            },
        )
        connection = post("/v1/connections", {"connector_id": connector["id"], "credentials": {}})
    invoke = f"/v1/connections/{connection['id']}/invoke"
    return Target(
        "backhaul",
        relay_url + invoke,
        headers=auth,
        ca_file=ca_file,
        memory_pids={"relay": relay.pid, "agent": agent.pid},
        local_base=f"http://127.0.0.1:{local_port}{invoke}" if local else None,
    )


def local_target(backhaul: Target) -> Target:
    """The Backhaul path with the caller on the relay's local listener: the same relay,
    agent, tunnel and connection (its processes counted for the CPU budget only)."""
    assert backhaul.local_base is not None
    return Target(
        LOCAL,
        backhaul.local_base,
        headers=backhaul.headers,
        cpu_pids={**backhaul.memory_pids, **backhaul.cpu_pids},
    )


SETUP: dict[str, Callable[..., Target]] = {
    "direct": setup_direct,
    "ssh": setup_ssh,
    "backhaul": setup_backhaul,
}


# --------------------------------------------------------------------------------------
# Report

ROWS = [
    ("rps", "Small requests/s (wrk, 64 conns, GET /small)", "{:,.0f}", "higher"),
    ("wrk_p50", "  latency p50 under that load (ms)", "{:.2f}", "lower"),
    ("wrk_p99", "  latency p99 under that load (ms)", "{:.2f}", "lower"),
    ("p50", "Latency p50, 1 client (ms)", "{:.3f}", "lower"),
    ("p99", "Latency p99, 1 client (ms)", "{:.3f}", "lower"),
    ("wrk1_p50", "Latency p50, 1 client, wrk -c1 (ms)", "{:.3f}", "lower"),
    ("wrk1_p99", "Latency p99, 1 client, wrk -c1 (ms)", "{:.3f}", "lower"),
    ("download", "Download {size} (MiB/s)", "{:,.1f}", "higher"),
    ("upload", "Upload {size} (MiB/s)", "{:,.1f}", "higher"),
]

MEMORY_ROWS = [
    ("rss_idle", "RSS idle, before any request (MiB)"),
    ("rss_transfers", "RSS before the first transfer, after the other measurements (MiB)"),
    ("rss_download", "Peak RSS during the download (MiB)"),
    ("rss_upload", "Peak RSS during the upload (MiB)"),
    ("rss_end", "RSS after the run (MiB)"),
    ("hwm", "VmHWM, high-water mark of the run (MiB)"),
]


#: The CPU budget table: (row label, the process's key on each path).
BUDGET_ROWS = [
    ("wrk, the client", {"direct": "wrk", "ssh": "wrk", "backhaul": "wrk"}),
    ("the tunnel's public end: sshd / relay", {"ssh": "sshd", "backhaul": "relay"}),
    ("the tunnel's private end: ssh / agent", {"ssh": "ssh", "backhaul": "agent"}),
    ("the sample API backend", {"direct": "backend", "ssh": "backend", "backhaul": "backend"}),
]


def cpu_budget(results: dict[str, Result | None]) -> list[str]:
    """Where the machine's cores go during the 64-client wrk run, per path: CPU time per
    request of every process on it, and the rate that total would allow on all cores."""

    def cpu(path: str, name: str | None) -> float | None:
        r = results.get(path)
        if r is None or name is None:
            return None
        return r.values.get(f"{name}_cpu_per_request")

    if not any(cpu(path, "wrk") is not None for path in PATHS):
        return []
    cores = os.cpu_count() or 1
    out = [
        "## CPU budget of a small request",
        "",
        "CPU time (user + system) per request during the 64-client wrk run above, for every"
        " process on the path, read from /proc (wrk from its resource usage). On a machine"
        " where all of them share the cores, their sum bounds the rate: at most"
        f" {cores} cores x 1,000 ms / (sum per request) requests per second.",
        "",
        "| CPU per request (ms) | direct | ssh -R | Backhaul |",
        "|---|---:|---:|---:|",
    ]
    totals: dict[str, float] = {}
    for label, names in BUDGET_ROWS:
        cells = []
        for path in PATHS:
            used = cpu(path, names.get(path))
            if used is not None:
                totals[path] = totals.get(path, 0.0) + used
            cells.append(fmt(used, "{:.3f}"))
        out.append(f"| {label} | {' | '.join(cells)} |")
    out.append("| **sum** | " + " | ".join(fmt(totals.get(p), "{:.3f}") for p in PATHS) + " |")
    out.append(
        f"| ceiling on {cores} cores (req/s) | "
        + " | ".join(
            fmt(cores * 1000 / totals[p] if totals.get(p) else None, "{:,.0f}") for p in PATHS
        )
        + " |"
    )
    out.append(
        "| measured (req/s) | "
        + " | ".join(
            fmt(rps.values.get("rps") if (rps := results.get(p)) else None, "{:,.0f}")
            for p in PATHS
        )
        + " |"
    )
    out.append("")
    return out


#: The tunnel's private end of each path: what it reads beside the backend's answers came
#: through the tunnel.
PRIVATE_END = {"ssh": "ssh", "backhaul": "agent"}


def tunnel_bytes(results: dict[str, Result | None]) -> list[str]:
    """Bytes that crossed the tunnel per small request in the 64-client wrk run, each way:
    what the private end read less what the backend wrote, and what it wrote less what the
    backend read."""

    def per_request(path: str, name: str, what: str) -> float | None:
        r = results.get(path)
        return None if r is None else r.values.get(f"{name}_{what}_per_request")

    rows: dict[str, list[float | None]] = {"down": [], "up": []}
    for path, end in PRIVATE_END.items():
        read, written = per_request(path, end, "read"), per_request(path, end, "written")
        backend_read = per_request(path, "backend", "read")
        backend_written = per_request(path, "backend", "written")
        down = read - backend_written if read is not None and backend_written is not None else None
        up = written - backend_read if written is not None and backend_read is not None else None
        rows["down"].append(down)
        rows["up"].append(up)
    if all(value is None for values in rows.values() for value in values):
        return []
    return [
        "## Bytes through the tunnel per small request",
        "",
        "From the same 64-client wrk run: what the tunnel's private end (ssh / agent) read,"
        " less what the backend wrote, came through the tunnel toward it; what it wrote, less"
        " what the backend read, went back. Bytes as the processes' system calls moved them"
        " (`rchar` and `wchar` of /proc/<pid>/io): SSH or TLS and WebSocket records included,"
        " TCP and IP headers not. A gateway's tunnel usually crosses a metered link.",
        "",
        "| Bytes per request | ssh -R | Backhaul |",
        "|---|---:|---:|",
        "| public end → private end (the request) | "
        + " | ".join(fmt(v, "{:,.0f}") for v in rows["down"])
        + " |",
        "| private end → public end (the answer, 1 KiB body) | "
        + " | ".join(fmt(v, "{:,.0f}") for v in rows["up"])
        + " |",
        "",
    ]


FAIRNESS_TARGET_MS = 10.0


#: The local-port comparison: (key, label, pattern); its ratios are of Backhaul on the local
#: port to ``ssh -R`` and to Backhaul over HTTPS.
LOCAL_ROWS = [
    ("rps", "Small requests/s (wrk, 64 conns)", "{:,.0f}"),
    ("wrk1_p50", "Latency p50, 1 client, wrk -c1 (ms)", "{:.3f}"),
    ("wrk1_p99", "Latency p99, 1 client, wrk -c1 (ms)", "{:.3f}"),
    ("download", "Download {size} (MiB/s)", "{:,.1f}"),
    ("upload", "Upload {size} (MiB/s)", "{:,.1f}"),
    ("relay_cpu_per_request", "Relay CPU per small request (ms)", "{:.3f}"),
    ("wrk_cpu_per_request", "wrk CPU per small request (ms)", "{:.3f}"),
]


def local_port(results: dict[str, Result | None], s: Settings) -> list[str]:
    """The section on Backhaul with the caller on the relay's local listener."""
    local, over_tls, ssh = (results.get(path) for path in (LOCAL, "backhaul", "ssh"))
    if local is None or not local.values or over_tls is None:
        return []
    ssh_values = ssh.values if ssh is not None else {}
    out = [
        "## Backhaul with the caller on the relay's local port",
        "",
        "`ssh -R` hands its caller a plain TCP port on the server's loopback; Backhaul's"
        " caller above speaks HTTPS to the relay's public listener, a TLS leg that `ssh -R`'s"
        " path does not have. The relay's `local_listen` (relay/listeners.py) is the"
        " counterpart of `ssh -R`'s port: plain HTTP on loopback, for a sidecar or a service"
        " on the relay's machine. The same relay, agent, tunnel (TLS as always) and"
        " connection, measured in the same rounds as the rows above, the paths taking turns:",
        "",
        "| Measurement | ssh -R | Backhaul, HTTPS | Backhaul, local port |"
        " local port / ssh -R | local port / HTTPS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    size = size_text(s.transfer_bytes)
    for key, label, pattern in LOCAL_ROWS:
        h, b, lo = ssh_values.get(key), over_tls.values.get(key), local.values.get(key)
        out.append(
            f"| {label.format(size=size)} | {fmt(h, pattern)} | {fmt(b, pattern)} |"
            f" {fmt(lo, pattern)} | {ratio(lo, h)} | {ratio(lo, b)} |"
        )
    runs = [
        f"{what} " + " / ".join(pattern.format(v) for v in local.runs[key])
        for key, what, pattern in (
            ("rps", "requests/s", "{:,.0f}"),
            ("download", "download MiB/s", "{:,.1f}"),
            ("upload", "upload MiB/s", "{:,.1f}"),
        )
        if local.runs.get(key)
    ]
    if runs:
        out += ["", "Backhaul on the local port, each run in order: " + "; ".join(runs) + "."]
    return [*out, ""]


def size_text(n: int) -> str:
    return f"{n // GiB} GiB" if n % GiB == 0 else f"{n // MiB} MiB"


def fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.3g}x"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"
    except OSError:
        return "unknown"


COMPILED_TREE = REPO / "build" / "compiled"


def choose_build(choice: str) -> str:
    """Which build of Backhaul the run measures: ``compiled`` puts the mypyc build of
    ``make compiled`` first on every child process's PYTHONPATH; ``auto`` takes it when it is
    there; either refuses a tree older than the source."""
    if choice == "python":
        return choice
    stamp = COMPILED_TREE / ".built"
    if not stamp.exists():
        if choice == "compiled":
            raise SystemExit(f"no {COMPILED_TREE}: run `make compiled`, or pass --build python")
        return "python"
    newest = max(
        p.stat().st_mtime
        for top in ("backhaul", "agent", "relay")
        for p in (REPO / top).rglob("*.py")
    )
    if newest > stamp.stat().st_mtime:
        raise SystemExit(
            f"{COMPILED_TREE} is older than the source: run `make compiled`, or pass --build python"
        )
    parts = [str(COMPILED_TREE), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return "compiled"


def machine_info(load_at_start: str, build: str = "python") -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"

    def version(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr) else "?"

    return {
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
        or str(os.cpu_count()),
        "CPU": cpu,
        "Memory": mem,
        "Kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_version()} ({platform.python_implementation()})",
        "wrk": version(["wrk", "-v"]).split(" Copyright")[0],
        "OpenSSH": version(["ssh", "-V"]),
        "Date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "Load average at start": load_at_start,
        "Backhaul build": (
            "mypyc, `make compiled` (setup.py)" if build == "compiled" else "Python source"
        ),
    }


def _listed_runs(results: dict[str, Result | None], key: str, pattern: str) -> list[str]:
    """Each path's runs of the measurement ``key``, in order: "<path> a / b / c"."""
    return [
        f"{LABELS[path]} " + " / ".join(pattern.format(value) for value in r.runs[key])
        for path in PATHS
        if (r := results.get(path)) is not None and r.runs.get(key)
    ]


def render(
    results: dict[str, Result | None],
    s: Settings,
    command: str,
    machine: dict[str, str],
    wall: float,
    chart: str,
) -> str:
    """The Markdown report; ``chart`` is the line that shows (or explains the lack of) the
    requests-per-second chart."""
    size = size_text(s.transfer_bytes)
    big = size_text(s.fairness_bytes)

    def value(path: str, key: str) -> float | None:
        r = results.get(path)
        return None if r is None else r.values.get(key)

    out = ["# Backhaul benchmark results", ""]
    if s.quick:
        out += ["**Quick run** (`--quick`): short durations, for a smoke test only.", ""]
    out += [
        "All three paths reach the same sample API backend (`backhaul.sampleapi`) on 127.0.0.1,",
        "measured in one run of:",
        "",
        "```",
        command,
        "```",
        "",
        "| Measurement | direct | ssh -R | Backhaul | Backhaul / direct | Backhaul / ssh -R |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label, pattern, _ in ROWS:
        d, h, b = value("direct", key), value("ssh", key), value("backhaul", key)
        out.append(
            f"| {label.format(size=size).strip()} | {fmt(d, pattern)} | {fmt(h, pattern)} |"
            f" {fmt(b, pattern)} | {ratio(b, d)} | {ratio(b, h)} |"
        )
    out += [
        "",
        "Ratios are Backhaul's figure divided by the other path's: above 1x is better for",
        "throughput rows, worse for latency rows.",
        "",
    ]
    rounds = _listed_runs(results, "rps", "{:,.0f}")
    if rounds and s.wrk_rounds > 1:
        out += [
            f"The rows measured under wrk at {s.wrk_connections} connections (requests/s, its"
            f" latency, and the CPU budget below) are the median of {s.wrk_rounds} runs per"
            " path, the paths taking turns (requests/s, in order): " + "; ".join(rounds) + ".",
            "",
        ]
    one_client = _listed_runs(results, "wrk1_p50", "{:.3f}")
    if one_client and s.wrk_rounds > 1:
        out += [
            f"The `wrk -c1` rows are the median of {s.wrk_rounds} runs per path too, one"
            " after each path's 64-client run (p50 in ms, in order): "
            + "; ".join(one_client)
            + ".",
            "",
        ]
    runs = [
        f"{LABELS[path]} {kind} " + " / ".join(f"{rate:,.1f}" for rate in r.runs[kind])
        for kind in ("download", "upload")
        for path in PATHS
        if (r := results.get(path)) is not None and r.runs.get(kind)
    ]
    if runs:
        out += [
            (
                f"The transfer rows are the median of {s.transfer_rounds} runs per path, the"
                " paths taking turns"
                if s.transfer_rounds > 1
                else "The transfer rows are one run per path"
            )
            + " (MiB/s, in order): "
            + "; ".join(runs)
            + ".",
            "",
        ]
    backhaul_result = results.get("backhaul")
    if backhaul_result is not None and backhaul_result.values:
        out += [
            "Backhaul processes (each summed with its child processes, if any):",
            "",
            "| Resource | relay | agent |",
            "|---|---:|---:|",
            f"| CPU time per small request during wrk (ms) |"
            f" {fmt(value('backhaul', 'relay_cpu_per_request'), '{:.3f}')} |"
            f" {fmt(value('backhaul', 'agent_cpu_per_request'), '{:.3f}')} |",
        ]
        for key, label in MEMORY_ROWS:
            out.append(
                f"| {label} | {fmt(value('backhaul', f'relay_{key}'), '{:.1f}')} |"
                f" {fmt(value('backhaul', f'agent_{key}'), '{:.1f}')} |"
            )
        out.append("")
    out += cpu_budget(results)
    out += tunnel_bytes(results)
    out += local_port(results, s)
    out += [
        "## Requests per second against concurrency",
        "",
        f"`GET /small` with N concurrent keep-alive clients (`wrk -cN -t min(N,2)"
        f" -d{s.sweep_seconds}s`), per path:",
        "",
        "| Concurrent clients | direct | ssh -R | Backhaul | Backhaul / direct |"
        " Backhaul / ssh -R |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in s.sweep_levels:
        d, h, b = (value(path, f"sweep_{n}") for path in PATHS)
        out.append(
            f"| {n} | {fmt(d, '{:,.0f}')} | {fmt(h, '{:,.0f}')} | {fmt(b, '{:,.0f}')} |"
            f" {ratio(b, d)} | {ratio(b, h)} |"
        )
    out += ["", chart, ""]

    out += [
        "## Fairness: small requests while a large transfer runs",
        "",
        f"One client makes {s.fairness_samples} sequential `GET /small` on its own kept-alive"
        " connection, first with the path idle, then while another client (curl, a separate"
        f" process) downloads {big} through the same path — for Backhaul, the same tunnel and"
        " agent.",
        "",
        "| Small GET /small, 1 client | direct | ssh -R | Backhaul | Backhaul / ssh -R |",
        "|---|---:|---:|---:|---:|",
    ]
    fairness_rows = [
        ("fair_idle_p50", "p50, path idle (ms)", "{:.3f}"),
        ("fair_idle_p99", "p99, path idle (ms)", "{:.3f}"),
        ("fair_load_p50", f"p50 while a {big} download runs (ms)", "{:.3f}"),
        ("fair_load_p99", f"p99 while a {big} download runs (ms)", "{:.3f}"),
        ("fair_samples", "small requests measured during the download", "{:,.0f}"),
        ("fair_download", "download speed meanwhile (MiB/s)", "{:,.1f}"),
    ]
    for key, label, pattern in fairness_rows:
        d, h, b = (value(path, key) for path in PATHS)
        versus = ratio(b, h) if key.startswith("fair_load") or key.startswith("fair_idle") else ""
        out.append(
            f"| {label} | {fmt(d, pattern)} | {fmt(h, pattern)} | {fmt(b, pattern)} | {versus} |"
        )
    out.append("")
    for path in ("backhaul", "ssh"):
        p99 = value(path, "fair_load_p99")
        if p99 is None:
            continue
        verdict = "met" if p99 <= FAIRNESS_TARGET_MS else "not met"
        extra = "" if path == "backhaul" else ", for comparison"
        out.append(
            f"- {LABELS[path]}: small p99 while a {big} transfer runs: **{p99:.2f} ms**"
            f" (target ≤ {FAIRNESS_TARGET_MS:g} ms{extra}: {verdict});"
            f" idle: {fmt(value(path, 'fair_idle_p99'), '{:.2f}')} ms."
        )
    if value("direct", "fair_load_p99") is not None:
        out.append(
            "- direct is the sample API on its own: one asyncio process that serves the download"
            " and the small requests, and does not yield while a fast reader keeps up (see"
            ' bench/README.md, "Reading the results").'
        )
    downloads = [value(path, "fair_downloads") for path in PATHS]
    if any(d is not None and d > 1 for d in downloads):
        out.append(
            "- When a download ended before all the small requests were measured, another"
            " one was started: downloads per path "
            + ", ".join(
                f"{LABELS[path]} {d:.0f}" for path, d in zip(PATHS, downloads, strict=True) if d
            )
            + "."
        )
    out += ["", "## Run", ""]
    notes = []
    for path in (*PATHS, LOCAL):
        if path not in results:
            if path != LOCAL:
                notes.append(f"- {LABELS[path]}: not run (`--only`).")
            continue
        r = results[path]
        if r is None:
            continue
        if r.error:
            notes.append(f"- {LABELS[path]}: **failed**: {r.error}")
        notes += [f"- {LABELS[path]}: {n}" for n in r.notes]
    if notes:
        out += ["Notes:", "", *notes, ""]
    out += [
        "Settings: "
        f"wrk -t{s.wrk_threads} -c{s.wrk_connections} -d{s.wrk_seconds}s"
        f" ({s.wrk_rounds} per path, the paths taking turns); "
        f"{s.latency_samples} latency samples after {s.latency_warmup} warm-up requests; "
        f"{size} transfers (curl, {s.transfer_rounds} each way per path, the paths taking turns);"
        " concurrency sweep at"
        f" {', '.join(map(str, s.sweep_levels))} clients, {s.sweep_seconds} s each;"
        f" fairness: {s.fairness_samples} small requests, idle and during a {big} download."
        f" Total wall time {wall:.0f} s.",
        "",
        "Machine:",
        "",
        "| | |",
        "|---|---|",
    ]
    out += [f"| {k} | {v} |" for k, v in machine.items()]
    out.append("")
    out += [
        "## Other benchmarks",
        "",
        "- `bench/cluster.py` → [CLUSTER-RESULTS.md](CLUSTER-RESULTS.md): one gateway with one"
        " member and with two, failover time, requests lost in a rolling restart; one relay"
        " with one worker process and with two, as they come and with each worker held to a"
        " share of a core.",
        "- `bench/scale.py` → [SCALE-RESULTS.md](SCALE-RESULTS.md): 1,000 concurrent streams on"
        " one tunnel, 1,000 idle agent tunnels and the relay's memory, reconnection after a"
        " relay restart.",
        '- `bench/winauth.py` → the "Windows authentication" section of this file, which it'
        " adds (rerun it after this script).",
        "- `.venv/bin/python bench/run.py --all` runs this benchmark and then all three.",
        "",
    ]
    return "\n".join(out)


def chart_path(output: Path) -> Path:
    """bench/requests-per-second.png for bench/RESULTS.md; <stem>-requests-per-second.png
    beside any other report, so that a quick run never replaces the published chart."""
    if output.name == "RESULTS.md":
        return output.with_name(CHART)
    return output.with_name(f"{output.stem}-{CHART}")


def write_chart(results: dict[str, Result | None], s: Settings, path: Path) -> str:
    """Draw requests/s against concurrency, one line per path; the report's line for it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        log("matplotlib is not installed: no chart (pip install -e '.[bench]')")
        return (
            "No chart: matplotlib is not installed"
            " (`.venv/bin/pip install -e '.[bench]'`, then rerun)."
        )
    styles = {
        "direct": ("tab:gray", "o"),
        "ssh": ("tab:orange", "s"),
        "backhaul": ("tab:blue", "D"),
    }
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    drawn = 0
    for name in PATHS:
        r = results.get(name)
        if r is None:
            continue
        points = [(n, r.values[f"sweep_{n}"]) for n in s.sweep_levels if f"sweep_{n}" in r.values]
        if not points:
            continue
        color, marker = styles[name]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=marker, color=color, linewidth=2, label=LABELS[name])
        for x, y in points:
            ax.annotate(
                f"{y:,.0f}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
                color=color,
            )
        drawn += 1
    if not drawn:
        plt.close(fig)
        log("no concurrency figures: no chart")
        return "No chart: no path has concurrency figures."
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(s.sweep_levels))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    # Log y too: the paths are an order of magnitude or more apart, and equal ratios
    # read as equal distances.
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low / 1.5, high * 1.5)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.yaxis.set_minor_formatter(
        FuncFormatter(lambda v, _: f"{v:,.0f}" if str(round(v))[0] in "25" else "")
    )
    ax.tick_params(axis="y", which="minor", labelsize=8)
    ax.set_xlabel("concurrent keep-alive clients (log scale)")
    ax.set_ylabel("requests/s, GET /small, 1 KiB (log scale)")
    title = "Small requests per second against concurrency, loopback"
    ax.set_title(title + (" (quick run)" if s.quick else ""))
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.12)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    log(f"wrote {path}")
    return f"![Requests per second against concurrency]({path.name})"


OTHERS = ("winauth.py", "cluster.py", "scale.py")


def run_others(quick: bool, output: Path) -> bool:
    """--all: the other benchmarks, one after the other, each with its own process handling.
    True if all of them succeeded."""
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    extra: dict[str, list[str]] = {
        # winauth.py rewrites its own section of the same report.
        "winauth.py": ["--quick", "--output", str(output)] if quick else ["--output", str(output)],
        "cluster.py": [
            "--seconds",
            "3",
            "--rounds",
            "1",
            "--output",
            str(out_dir / "CLUSTER-RESULTS-quick.md"),
        ]
        if quick
        else [],
        "scale.py": [
            "--agents",
            "100",
            "--streams",
            "100",
            "--output",
            str(out_dir / "SCALE-RESULTS-quick.md"),
        ]
        if quick
        else [],
    }
    ok = True
    for script in OTHERS:
        argv = [sys.executable, str(REPO / "bench" / script), *extra[script]]
        log(f"=== {script} ===")
        log(f"run: {shlex.join(argv)}")
        # Its own session: a Ctrl-C here reaches it once, forwarded below, and it cleans up.
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            status = proc.wait()
        except BaseException:
            log(f"stopping {script}")
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # unwinds its finally blocks
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
            stop_process(script, proc)
            raise
        if status != 0:
            log(f"{script} failed with status {status}")
            ok = False
    return ok


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short run for a smoke test")
    parser.add_argument(
        "--only", default=",".join(PATHS), help="comma-separated paths: direct,ssh,backhaul"
    )
    parser.add_argument("--output", type=Path, help="report file (default: bench/RESULTS.md)")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument(
        "--all",
        action="store_true",
        help="then run bench/winauth.py, bench/cluster.py and bench/scale.py (short with --quick)",
    )
    parser.add_argument(
        "--build",
        choices=("auto", "compiled", "python"),
        default="auto",
        help="Backhaul's build: the mypyc one of `make compiled`, or the source (auto: the"
        " compiled one when it is built and current)",
    )
    args = parser.parse_args(argv)
    build = choose_build(args.build)
    log(f"Backhaul build: {build}")

    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(only) - set(PATHS)
    if unknown or not only:
        parser.error(f"--only takes some of {','.join(PATHS)}")
    settings = QUICK if args.quick else FULL
    output = args.output or (
        REPO / "bench" / "out" / "RESULTS-quick.md" if args.quick else REPO / "bench" / "RESULTS.md"
    )
    if shutil.which("wrk") is None:
        log("wrk not found: run `bash bench/setup.sh` first")
        return 2

    command = shlex.join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    # Also when started in the background, where SIGINT may be inherited as ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="backhaul-bench-"))
    results: dict[str, Result | None] = {}
    started = time.monotonic()
    load_at_start = load_average()
    failed = False
    try:
        log(f"temp dir {tmp}")
        backend = sampleapi.start_subprocess(
            "127.0.0.1", 0, timeout=30, stderr=subprocess.DEVNULL, start_new_session=True
        )
        procs.adopt("sample API", backend.process)
        log(f"sample API backend at {backend.url} (pid {backend.pid})")
        targets: dict[str, Target] = {}
        for path in PATHS:
            if path not in only:
                continue
            log(f"=== {LABELS[path]} ===")
            try:
                target = SETUP[path](backend_port=backend.port, procs=procs, tmp=tmp, local=True)
                target.cpu_pids["backend"] = backend.pid
                results[path] = measure(target, settings, procs, tmp)
                targets[path] = target
            except Exception as exc:
                failed = True
                log(f"{LABELS[path]} failed:\n{traceback.format_exc()}")
                results[path] = Result(error=" ".join(str(exc).split())[:500] or repr(exc))
        if "backhaul" in targets:
            targets[LOCAL] = local_target(targets["backhaul"])
            try:
                check_target(targets[LOCAL])
                results[LOCAL] = Result()
            except Exception as exc:
                failed = True
                del targets[LOCAL]
                results[LOCAL] = Result(error=" ".join(str(exc).split())[:500] or repr(exc))
        measured = {path: r for path, r in results.items() if r is not None and not r.error}
        log("=== small requests, the paths taking turns ===")
        measure_small_requests(targets, measured, settings)
        log("=== transfers, the paths taking turns ===")
        measure_transfers(targets, measured, settings)
        for path, outcome in results.items():
            if outcome is not None and outcome.notes:
                failed = True
                for note in outcome.notes:
                    log(f"{LABELS[path]}: {note}")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except SystemExit as exc:
        log(f"stopped by a signal (exit status {exc.code})")
        raise
    finally:
        procs.stop_all()
        for body in Path(tempfile.gettempdir()).glob(f"backhaul-bench-upload-{os.getpid()}-*"):
            body.unlink(missing_ok=True)
        if failed:
            save_logs(tmp, REPO / "bench" / "out" / "logs")
        if args.keep_temp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    chart = write_chart(results, settings, chart_path(output))
    report = render(
        results,
        settings,
        command,
        machine_info(load_at_start, build),
        time.monotonic() - started,
        chart,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(report)
    log(f"wrote {output}")
    if args.all:
        try:
            if not run_others(args.quick, output):
                failed = True
        except KeyboardInterrupt:
            log("interrupted")
            return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
