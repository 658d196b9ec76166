"""Where does a small request's CPU go? Sample the relay and the agent under load.

    .venv/bin/python bench/profile.py [--seconds 10] [--connections 64] [--top 25]

Starts the same sample API, relay and enrolled agent as ``bench/run.py`` (its
``setup_backhaul``), puts ``wrk -c64`` on ``GET /small`` through the tunnel, and samples both
processes with py-spy (``record --format raw``, 200 Hz, ``--nonblocking`` so the target is never
paused). Prints, per process, its CPU time and the bytes it read and wrote (sockets included)
per request, the functions with the most samples on top of the stack (self)
and the most samples anywhere in the stack (inclusive), and the wrk figures of the same run.
Collapsed stacks are kept under ``bench/out/profile-{relay,agent}.txt`` for flame graphs.

Needs py-spy (``.venv/bin/pip install py-spy``) and ``bash bench/setup.sh``.
"""

from __future__ import annotations

import argparse
import collections
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import run as bench  # noqa: E402

from backhaul import sampleapi  # noqa: E402


def summarize(raw: Path, top: int) -> str:
    """The event loop thread's samples only: py-spy also reports the database and executor
    threads while they wait for work, which would dilute every figure (their real CPU time
    is in the per-thread figures above)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames or frames[0].startswith("Thread._bootstrap"):
            continue
        total += count
        own[_short(frames[-1])] += count
        for name in {_short(f) for f in frames}:
            inclusive[name] += count
    lines = [f"  {total} samples of the event loop thread"]
    lines.append("  self:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread of a process ("tid name" → seconds)."""
    seconds: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        seconds[f"{task.name} {name}"] = bench.stat_cpu(task / "stat")
    return seconds


def _short(frame: str) -> str:
    """``func (path/to/module.py:123)`` → ``func (module.py)``: one row per function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=200, help="samples/s; 0: no sampling")
    parser.add_argument(
        "--native",
        action="store_true",
        help="C frames too (py-spy --native): compiled modules, uvloop, OpenSSL, system calls",
    )
    parser.add_argument(
        "--relay-args", default="", help="extra `backhaul-relay serve` arguments, e.g. --workers 2"
    )
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    procs = bench.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="backhaul-profile-"))
    try:
        backend = sampleapi.start_subprocess(
            "127.0.0.1", 0, timeout=30, stderr=subprocess.DEVNULL, start_new_session=True
        )
        procs.adopt("sample API", backend.process)
        target = bench.setup_backhaul(
            backend_port=backend.port,
            procs=procs,
            tmp=tmp,
            relay_args=tuple(shlex.split(args.relay_args)),
        )
        bench.check_target(target)
        bench.run_wrk(target, args.connections, min(2, args.connections), 2)  # warm up
        spies = {}
        for name, pid in target.memory_pids.items() if args.rate else ():
            spies[name] = subprocess.Popen(
                [
                    *(spy, "record", "--format", "raw", "--rate", str(args.rate)),
                    *(("--native",) if args.native else ()),
                    *("--duration", str(args.seconds + 1), "--pid", str(pid)),
                    *("--output", str(out / f"profile-{name}.txt")),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(0.5)
        cpu_before = {n: bench.tree_cpu(p) for n, p in target.memory_pids.items()}
        threads_before = {n: thread_cpu(p) for n, p in target.memory_pids.items()}
        io_before = {n: bench.tree_io(p) for n, p in target.memory_pids.items()}
        wrk = bench.run_wrk(target, args.connections, min(2, args.connections), args.seconds)
        cpu_after = {n: bench.tree_cpu(p) for n, p in target.memory_pids.items()}
        threads_after = {n: thread_cpu(p) for n, p in target.memory_pids.items()}
        io_after = {n: bench.tree_io(p) for n, p in target.memory_pids.items()}
        for spy_proc in spies.values():
            spy_proc.wait(timeout=60)
        rate, _errors = bench.wrk_rate(wrk)
        print(f"wrk -c{args.connections} -d{args.seconds}s: {rate:,.0f} requests/s")
        for problem in bench.wrk_problems(wrk):
            print(f"  wrk: {problem}")
        for name in target.memory_pids:
            used = cpu_after[name] - cpu_before[name]
            requests = max(1.0, rate * args.seconds)
            per = 1000 * used / requests
            read, written = (a - b for a, b in zip(io_after[name], io_before[name], strict=True))
            print(
                f"\n{name}: {used:.2f} s CPU, {per:.3f} ms per request; bytes per request:"
                f" {read / requests:,.0f} read, {written / requests:,.0f} written"
            )
            for thread, after in sorted(threads_after[name].items()):
                spent = after - threads_before[name].get(thread, 0.0)
                if spent >= 0.01:
                    share = 1000 * spent / max(1.0, rate * args.seconds)
                    print(f"  thread {thread}: {spent:.2f} s, {share:.3f} ms per request")
            if name in spies:
                print(summarize(out / f"profile-{name}.txt", args.top))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
