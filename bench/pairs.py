"""Two builds of Backhaul side by side: small requests through each, in alternating rounds.

    .venv/bin/python bench/pairs.py BEFORE AFTER [--rounds 8] [--connections 1] [--seconds 4]

On a machine whose speed moves from one minute to the next, figures from different runs do
not compare code. This starts one sample API and, for each of two trees (each a directory
put first on its processes' ``PYTHONPATH``: a ``make compiled`` build copied aside, or
``git archive <commit> | tar -x -C DIR`` for the source), a relay and an enrolled agent, as
``bench/run.py`` does (its ``setup_backhaul``). Then ``wrk`` runs ``GET /small`` through one
and then the other, the order swapped every round, so a drift of the machine falls on both.
Each round prints requests/s, wrk's p50 and the relay's and agent's CPU per request; the end
prints the medians, and in how many rounds AFTER was ahead. bench/PROFILE.md's A/B tables
("One stream in flight") were measured this way.

Needs ``bash bench/setup.sh`` (wrk).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import run as bench  # noqa: E402

from backhaul import sampleapi  # noqa: E402


@dataclass
class Rounds:
    """One build's figures, a row per round: req/s, p50 ms, relay and agent ms/request."""

    name: str
    rows: list[tuple[float, float, float, float]] = field(default_factory=list)

    def median(self, column: int) -> float:
        return statistics.median(row[column] for row in self.rows)


def measure(
    target: bench.Target, connections: int, seconds: int
) -> tuple[float, float, float, float]:
    threads = 1 if connections == 1 else 2
    before = {name: bench.tree_cpu(pid) for name, pid in target.memory_pids.items()}
    out = bench.run_wrk(target, connections, threads, seconds)
    after = {name: bench.tree_cpu(pid) for name, pid in target.memory_pids.items()}
    rate, total = bench.wrk_rate(out)
    p50 = bench.wrk_percentiles(out).get("50", float("nan"))
    per = {name: 1000 * (after[name] - before[name]) / max(1, total) for name in after}
    return rate, p50, per["relay"], per["agent"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("before", type=Path, help="tree of the build to compare against")
    parser.add_argument("after", type=Path, help="tree of the build under test")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for tree in trees.values():
        if not (tree / "backhaul").is_dir():
            print(f"{tree}: no backhaul package in it", file=sys.stderr)
            return 2
    procs = bench.Processes()
    temps: list[Path] = []
    inherited = os.environ.get("PYTHONPATH")
    try:
        backend = sampleapi.start_subprocess(
            "127.0.0.1", 0, timeout=30, stderr=subprocess.DEVNULL, start_new_session=True
        )
        procs.adopt("sample API", backend.process)
        targets: dict[str, bench.Target] = {}
        for name, tree in trees.items():
            os.environ["PYTHONPATH"] = str(tree)  # read by the processes setup starts
            temp = Path(tempfile.mkdtemp(prefix=f"backhaul-pairs-{name}-"))
            temps.append(temp)
            targets[name] = bench.setup_backhaul(backend_port=backend.port, procs=procs, tmp=temp)
            bench.check_target(targets[name])
            bench.run_wrk(targets[name], args.connections, 1, 2)  # warm up
        results = {name: Rounds(name) for name in trees}
        for number in range(args.rounds):
            order = ("before", "after") if number % 2 == 0 else ("after", "before")
            for name in order:
                row = measure(targets[name], args.connections, args.seconds)
                results[name].rows.append(row)
                print(
                    f"round {number} {name:6}: {row[0]:8,.0f} req/s  p50 {row[1]:.3f} ms"
                    f"  relay {row[2]:.3f}  agent {row[3]:.3f} ms/request",
                    flush=True,
                )
        ahead = sum(
            1
            for before, after in zip(results["before"].rows, results["after"].rows, strict=True)
            if after[0] > before[0]
        )
        for rounds in results.values():
            print(
                f"{rounds.name:6} medians: {rounds.median(0):,.0f} req/s, p50"
                f" {rounds.median(1):.3f} ms, relay {rounds.median(2):.3f}, agent"
                f" {rounds.median(3):.3f} ms/request"
            )
        print(f"after ahead in requests/s in {ahead} of {args.rounds} rounds")
    finally:
        if inherited is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = inherited
        procs.stop_all()
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
