"""Where does a transfer's CPU go? CPU per MiB of every process on each path, in turns.

    .venv/bin/python bench/transfer_cpu.py [--rounds 3] [--mib 256] [--paths ssh,backhaul]
    .venv/bin/python bench/transfer_cpu.py --paths backhaul --against /tmp/before

Starts the same sample API, ``ssh -R`` tunnel and Backhaul relay and agent as ``bench/run.py``
(its ``setup_ssh`` and ``setup_backhaul``; ``local`` is a Backhaul whose caller uses the relay's
plain-HTTP local listener, ``--local-listen``), then moves ``--mib`` MiB down and up with curl
on each path, the paths taking turns for ``--rounds`` rounds. For every transfer it prints
the rate and the CPU time each process spent per MiB (user + system from /proc, children
included; curl's from this process's children), which on a machine where all of them share
the cores is what bounds the rate.

``--against DIR`` adds a second Backhaul, run from another checkout of the code (``git
worktree add DIR <commit>`` or ``git archive <commit> | tar -x -C DIR``), and alternates the
two: the way each change in bench/PROFILE.md was measured against the code before it. Its
processes get ``PYTHONPATH=DIR``, so they import that tree's ``backhaul``, ``agent`` and
``relay`` with this venv's packages. At the end, the mean of every figure per path.

Needs ``bash bench/setup.sh`` (sshd, curl).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import run as bench  # noqa: E402

from backhaul import sampleapi  # noqa: E402

MiB = bench.MiB


def transfer(target: bench.Target, kind: str, n: int, body: Path) -> float:
    """One curl transfer of ``n`` bytes; its rate in MiB/s."""
    if kind == "down":
        argv = bench.download_argv(target, n)
    else:
        argv = bench.upload_argv(target, body, "/dev/null")
    return bench.curl_rate(bench.run_cmd(argv, bench.TRANSFER_LIMIT_S, kind), n, kind)


def measure(target: bench.Target, kind: str, n: int, body: Path) -> dict[str, float]:
    """The rate and every process's CPU milliseconds per MiB for one transfer."""
    pids = {**target.memory_pids, **target.cpu_pids}
    before = {name: bench.tree_cpu(pid) for name, pid in pids.items()}
    curl_before = bench.children_cpu()
    rate = transfer(target, kind, n, body)
    per_mib = 1000 / (n / MiB)
    figures = {"MiB/s": rate}
    for name, pid in pids.items():
        figures[name] = (bench.tree_cpu(pid) - before[name]) * per_mib
    figures["curl"] = (bench.children_cpu() - curl_before) * per_mib
    return figures


def setup(
    name: str, backend_port: int, procs: bench.Processes, tmp: Path, tree: str | None
) -> bench.Target:
    saved = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = tree
    try:
        if name == "ssh":
            target = bench.setup_ssh(backend_port=backend_port, procs=procs, tmp=tmp)
        else:
            target = bench.setup_backhaul(
                backend_port=backend_port, procs=procs, tmp=tmp, local=name == "local"
            )
            if name == "local":
                target = bench.local_target(target)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    bench.check_target(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument(
        "--paths", default="ssh,backhaul", help="comma-separated: ssh,backhaul,local"
    )
    parser.add_argument("--against", help="another checkout to run a second Backhaul from")
    args = parser.parse_args(argv)
    n = args.mib * MiB
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - {"ssh", "backhaul", "local"}
    if unknown or not paths:
        parser.error(f"--paths takes ssh, backhaul and local, not {', '.join(sorted(unknown))}")
    procs = bench.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="backhaul-transfer-cpu-"))
    results: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
    try:
        backend = sampleapi.start_subprocess(
            "127.0.0.1", 0, timeout=30, stderr=subprocess.DEVNULL, start_new_session=True
        )
        procs.adopt("sample API", backend.process)
        targets: dict[str, bench.Target] = {}
        variants: list[tuple[str, str, str | None]] = [(p, p, None) for p in paths]
        if args.against:
            other = str(Path(args.against).resolve())
            variants.append(("backhaul (against)", "backhaul", other))
        for label, name, tree in variants:
            where = tmp / label.replace(" ", "-").strip("()")
            where.mkdir()
            target = setup(name, backend.port, procs, where, tree)
            target.cpu_pids["backend"] = backend.pid
            targets[label] = target
        body = bench.upload_file(n)
        for round_no in range(1, args.rounds + 1):
            for label, target in targets.items():
                for kind in ("down", "up"):
                    figures = measure(target, kind, n, body)
                    results[(label, kind)].append(figures)
                    cpu = "  ".join(f"{k} {v:.2f}" for k, v in figures.items() if k != "MiB/s")
                    print(
                        f"round {round_no}  {label:20s} {kind:4s} {figures['MiB/s']:8.1f} MiB/s"
                        f"  ms of CPU per MiB: {cpu}",
                        flush=True,
                    )
    finally:
        procs.stop_all()
        for leftover in Path(tempfile.gettempdir()).glob(f"backhaul-bench-upload-{os.getpid()}-*"):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nmeans:")
    for (label, kind), runs in results.items():
        means = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        cpu = "  ".join(f"{k} {v:.2f}" for k, v in means.items() if k != "MiB/s")
        print(f"  {label:20s} {kind:4s} {means['MiB/s']:8.1f} MiB/s  ms of CPU per MiB: {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
