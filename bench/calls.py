"""Which interpreted Python functions does a small request run? Counted, per request.

    PYTHONPATH=build/compiled .venv/bin/python bench/calls.py [--seconds 5] [--connections 1]

In the compiled build (``make compiled``) the data path is C, and what still runs as Python
bytecode costs a frame, argument handling and a dispatch loop per call: it shows up as
``_PyEval_EvalFrameDefault`` in ``perf`` and as nothing in particular in py-spy, which folds
compiled frames into the nearest Python one. This counts it instead. The relay and the agent
start as in ``bench/run.py`` (its ``setup_backhaul``) with a ``sitecustomize`` that installs
``sys.setprofile``: every Python frame entered (a coroutine's resumption included) is counted
by function, while C functions and compiled code are not. ``wrk`` puts ``GET /small`` through
the tunnel; the counts are reset when it starts and read when it ends, and divided by the
requests it made. The profile hook slows both processes several times over, so the counts
are the measurement here, not the speed. Needs ``bash bench/setup.sh`` (wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import run as bench  # noqa: E402

from backhaul import sampleapi  # noqa: E402

#: Loaded by every Python process started with its directory on PYTHONPATH; counts only in
#: ``backhaul-relay serve`` and ``backhaul-agent run``, and only when BACKHAUL_CALLS_DIR is set.
SITECUSTOMIZE = """
import collections, json, os, signal, sys

_out = os.environ.get("BACKHAUL_CALLS_DIR")
_argv = " ".join(sys.argv)
_name = (
    "relay" if "backhaul-relay" in _argv and "serve" in sys.argv
    else "agent" if "backhaul-agent" in _argv and "run" in sys.argv
    else None
)
if _out and _name:
    _counts = collections.Counter()

    def _profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            _counts[(code.co_qualname, code.co_filename, code.co_firstlineno)] += 1

    def _reset(*_):
        _counts.clear()

    def _dump(*_):
        rows = [[n, q, f"{f}:{line}"] for (q, f, line), n in _counts.most_common()]
        with open(os.path.join(_out, _name + ".json"), "w") as out:
            json.dump(rows, out)

    signal.signal(signal.SIGUSR2, _reset)
    signal.signal(signal.SIGUSR1, _dump)
    sys.setprofile(_profile)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    procs = bench.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="backhaul-calls-"))
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    counts = tmp / "counts"
    counts.mkdir()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p
    )
    os.environ["BACKHAUL_CALLS_DIR"] = str(counts)
    try:
        backend = sampleapi.start_subprocess("127.0.0.1", 0, timeout=30, start_new_session=True)
        procs.adopt("sample API", backend.process)
        target = bench.setup_backhaul(backend_port=backend.port, procs=procs, tmp=tmp)
        bench.check_target(target)
        bench.run_wrk(target, args.connections, min(2, args.connections), 2)  # warm up
        pids = dict(target.memory_pids)
        for pid in pids.values():
            os.kill(pid, signal.SIGUSR2)
        time.sleep(0.2)
        wrk = bench.run_wrk(target, args.connections, min(2, args.connections), args.seconds)
        for pid in pids.values():
            os.kill(pid, signal.SIGUSR1)
        time.sleep(1.0)
        rate, _errors = bench.wrk_rate(wrk)
        requests = max(1.0, rate * args.seconds)
        print(f"wrk -c{args.connections} -d{args.seconds}s: {requests:,.0f} requests")
        for name in pids:
            rows = json.loads((counts / f"{name}.json").read_text())
            per_request = [(n / requests, q, where) for n, q, where in rows]
            total = sum(n for n, _, _ in per_request)
            print(f"\n{name}: {total:.1f} interpreted calls per request")
            for n, qualname, where in per_request[: args.top]:
                if n >= 0.05:
                    print(f"  {n:6.2f}  {qualname}  ({_short(where)})")
    finally:
        procs.stop_all()
    return 0


def _short(where: str) -> str:
    for marker in ("site-packages/", "/lib/python3", str(REPO) + "/"):
        if marker in where:
            return where.split(marker, 1)[1]
    return where


if __name__ == "__main__":
    sys.exit(main())
