"""Backhaul benchmark, Windows authentication: requests/s through Backhaul to an API behind
NTLM and behind Kerberos, and how many handshakes that costs per 1,000 requests.

    bash tests/real/setup.sh && bash bench/setup.sh      # once: KDC, Apache, wrk
    .venv/bin/python bench/winauth.py [--quick] [--output bench/RESULTS.md]

Everything runs on 127.0.0.1 as this script's own processes (tests/real/servers.py): an MIT
KDC, Apache with mod_auth_gssapi over HTTPS (``GssapiConnectionBound On``, so the server keeps
a connection authenticated, as IIS does), a Backhaul relay and an enrolled agent. Three
connectors on the same Apache: ``/open/`` (no authentication, the baseline), ``/ntlm/`` (NTLM
through gss-ntlmssp) and ``/krb/`` (Kerberos); all HTTPS, so every token carries channel
bindings.

Per connector:

* **one client**: 1,000 sequential GETs on one kept-alive connection to the relay, from cold
  (the agent has never talked to that API with that credential);
* **wrk**: ``wrk -t2 -c16 -d10s``, 16 concurrent keep-alive callers.

Handshakes are counted three ways, which must agree: the agent's
``backhaul_agent_windows_handshakes_total`` (security contexts started), Apache's access log
(requests that carried an ``Authorization`` token: NTLM needs two per handshake, Kerberos one)
and, for Kerberos, the KDC's log (AS and TGS exchanges, i.e. tickets bought). The report is
written into the "Windows authentication" section of bench/RESULTS.md (the rest of the file is
left as bench/run.py wrote it).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backhaul.devstack import DevStack, StackError, command, free_port  # noqa: E402
from tests.real.servers import NTLM_DOMAIN, REALM, USERS, RealServers  # noqa: E402

START = "<!-- winauth:start -->"
END = "<!-- winauth:end -->"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    name: str
    path: str
    connection_id: str = ""
    seq_rps: float = 0.0
    seq_requests: int = 0
    seq_handshakes: float = 0
    seq_token_legs: int = 0
    seq_kdc: int = 0
    wrk_rps: float = 0.0
    wrk_requests: int = 0
    wrk_handshakes: float = 0
    wrk_token_legs: int = 0
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, root: Path, servers: RealServers, quick: bool) -> None:
        self.root = root
        self.servers = servers
        self.quick = quick
        self.status_port = free_port()
        env = {
            "KRB5_CONFIG": str(servers.realm.krb5_conf),
            "BACKHAUL_AGENT_STATUS__LISTEN": f"127.0.0.1:{self.status_port}",
            "BACKHAUL_AGENT_LOG__LEVEL": "warning",
            "BACKHAUL_RELAY_LOG_LEVEL": "warning",
        }
        self.stack = DevStack(root / "stack", env=env)
        self.gateway_id = ""

    def start(self) -> None:
        stack = self.stack
        stack.start_relay()
        stack.create_admin()
        gateway = stack.call("POST", "/v1/gateways", json={"name": "bench-win"})
        self.gateway_id = gateway["id"]
        agent_dir = stack.root / "agent"
        argv = [command("backhaul-agent"), "enroll", "--relay", stack.relay_url]
        argv += ["--token", gateway["enrollment_token"], "--ca-file", str(stack.ca_file)]
        argv += ["--config-dir", str(agent_dir), "--allow", self.servers.apache.https_url]
        argv += ["--target-ca-file", str(self.servers.pki.ca_file)]
        done = subprocess.run(argv, capture_output=True, env=stack.env, check=False)
        if done.returncode != 0:
            raise StackError(f"enroll failed: {done.stdout.decode()} {done.stderr.decode()}")
        stack.start_agent(agent_dir)

    def connect(self, row: Row) -> None:
        base = self.servers.apache.https_url + row.path
        if row.name == "none":
            row.connection_id = self.stack.connection(self.gateway_id, base)
        elif row.name == "NTLM":
            creds = {"username": f"{NTLM_DOMAIN}\\alice", "password": USERS["alice"]}
            row.connection_id = self.stack.connection(
                self.gateway_id, base, "windows", creds, windows_scheme="ntlm"
            )
        else:
            creds = {"username": f"alice@{REALM}", "password": USERS["alice"]}
            row.connection_id = self.stack.connection(
                self.gateway_id, base, "windows", creds, windows_scheme="kerberos"
            )

    # -- counters

    def handshakes(self) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.status_port}/metrics", timeout=10).text
        return sum(
            float(m.group(1))
            for m in re.finditer(
                r"^backhaul_agent_windows_handshakes_total\{[^}]*\} (\S+)$", text, re.M
            )
        )

    def token_legs(self, path: str) -> int:
        pattern = re.compile(rf'"GET /{re.escape(path)}\S* HTTP/1\.1" \d+ \d+ (Negotiate|NTLM) ')
        return sum(
            1 for line in self.servers.apache.requests_logged("/" + path) if pattern.search(line)
        )

    def kdc_exchanges(self) -> int:
        path = self.servers.realm.kdc.directory / "kdc-events.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text.count("AS_REQ") + text.count("TGS_REQ")

    # -- measurements

    def sequential(self, row: Row, count: int) -> None:
        url = f"/v1/connections/{row.connection_id}/invoke/whoami"
        before = (self.handshakes(), self.token_legs(row.path), self.kdc_exchanges())
        with self.stack.client(timeout=60) as client:
            started = time.perf_counter()
            for _ in range(count):
                r = client.get(url)
                if r.status_code != 200:
                    raise RuntimeError(f"{row.name}: {r.status_code} {r.text[:300]}")
            elapsed = time.perf_counter() - started
        row.seq_requests = count
        row.seq_rps = count / elapsed
        row.seq_handshakes = self.handshakes() - before[0]
        row.seq_token_legs = self.token_legs(row.path) - before[1]
        row.seq_kdc = self.kdc_exchanges() - before[2]

    def wrk(self, row: Row, seconds: int, connections: int) -> None:
        before = (self.handshakes(), self.token_legs(row.path))
        argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
        argv += ["-H", f"Authorization: Bearer {self.stack.admin_token}"]
        argv.append(f"{self.stack.relay_url}/v1/connections/{row.connection_id}/invoke/whoami")
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 60, stdin=subprocess.DEVNULL
        )
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed: {done.stdout}{done.stderr}")
        rps = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
        total = re.search(r"^\s*(\d+) requests in", done.stdout, re.M)
        if not rps or not total:
            raise RuntimeError(f"cannot parse wrk output:\n{done.stdout}")
        row.wrk_rps, row.wrk_requests = float(rps.group(1)), int(total.group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", done.stdout)
        if non2xx:
            row.notes.append(f"wrk: {non2xx.group(1)} non-2xx responses")
        row.wrk_handshakes = self.handshakes() - before[0]
        row.wrk_token_legs = self.token_legs(row.path) - before[1]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def per_thousand(count: float, requests: int) -> str:
    return f"{count / requests * 1000:.1f}" if requests else "-"


def report(rows: list[Row], args: argparse.Namespace, wall: float, load: float) -> str:
    lines = [
        START,
        "## Windows authentication",
        "",
        "Through Backhaul (caller → HTTPS relay → tunnel → agent → HTTPS Apache with "
        "mod_auth_gssapi, `GssapiConnectionBound On`), to a small JSON answer naming the "
        "authenticated user; the MIT KDC and Apache run on the same machine. Measured in one "
        "run of:",
        "",
        "```",
        ".venv/bin/python bench/winauth.py" + (" --quick" if args.quick else ""),
        "```",
        "",
        f"| Connector | 1 client, req/s | handshakes in {rows[0].seq_requests:,} requests "
        f"(per 1,000) | wrk -c{args.connections}, req/s | handshakes in the wrk run "
        "(per 1,000) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        hs_seq = (
            "-"
            if row.name == "none"
            else (
                f"{row.seq_handshakes:.0f} ({per_thousand(row.seq_handshakes, row.seq_requests)})"
            )
        )
        hs_wrk = (
            "-"
            if row.name == "none"
            else (
                f"{row.wrk_handshakes:.0f} in {row.wrk_requests:,} "
                f"({per_thousand(row.wrk_handshakes, row.wrk_requests)})"
            )
        )
        lines.append(
            f"| {row.name} (`/{row.path}`) | {row.seq_rps:,.0f} | {hs_seq} | "
            f"{row.wrk_rps:,.0f} | {hs_wrk} |"
        )
    lines += [
        "",
        "Cross-checks from the servers' own logs for the same runs:",
        "",
    ]
    for row in rows:
        if row.name == "none":
            continue
        per = 2 if row.name == "NTLM" else 1
        extra = (
            f"; the KDC logged {row.seq_kdc} exchanges in all (AS-REQ without and with "
            "pre-authentication, one TGS-REQ for HTTP/localhost)"
            if row.name == "Kerberos"
            else ""
        )
        lines.append(
            f"- {row.name}: Apache logged {plural(row.seq_token_legs, 'request')} with a token "
            f"in the 1-client run and {row.wrk_token_legs} in the wrk run ({per} per "
            f"handshake){extra}."
        )
    notes = [n for row in rows for n in row.notes]
    lines += [
        "",
        "A handshake is needed once per connection between the agent and the API: the 1-client "
        "run uses one, and wrk's concurrent callers make the agent open one connection per "
        "concurrent request (up to 16 per credential), each authenticated once. Kerberos "
        "tickets are bought once per credential (TGT) and per SPN (service ticket) and then "
        "served from the agent's memory. The `none` row is the same Apache without "
        "authentication; it goes through the agent's shared connection pool for "
        "unauthenticated calls, while Windows-authenticated calls use per-credential "
        "single-connection clients (agent/winpool.py), which is why `none` is not the "
        "fastest row under concurrency: handshakes cost a round trip once per connection, "
        "and nothing per request after that.",
        *(["", "Notes: " + "; ".join(notes)] if notes else []),
        "",
        f"Machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}; load average {load:.2f} at the start; "
        f"total wall time {wall:.0f} s; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Backhaul benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 requests, 3 s of wrk")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.requests, args.seconds = 200, 3
        if args.output == REPO / "bench" / "RESULTS.md":
            args.output = REPO / "bench" / "out" / "RESULTS-winauth-quick.md"
    if shutil.which("wrk") is None:
        log("wrk not found: run `bash bench/setup.sh` first")
        return 2
    started = time.monotonic()
    rows = [Row("NTLM", "ntlm/"), Row("Kerberos", "krb/"), Row("none", "open/")]
    load = 0.0
    tmp = Path(tempfile.mkdtemp(prefix="backhaul-bench-win-"))
    try:
        with RealServers() as servers:
            bench = Bench(tmp, servers, args.quick)
            try:
                log("starting relay and agent")
                bench.start()
                for row in rows:
                    bench.connect(row)
                # Warm the relay, the tunnel and the agent up on the unauthenticated path.
                bench.sequential(rows[-1], 100)
                load = os.getloadavg()[0]
                for row in rows:
                    log(f"{row.name}: {args.requests} sequential requests")
                    bench.sequential(row, args.requests)
                    log(f"{row.name}: wrk -c{args.connections} for {args.seconds}s")
                    bench.wrk(row, args.seconds, args.connections)
                    log(
                        f"{row.name}: {row.seq_rps:.0f} req/s (1 client), "
                        f"{row.wrk_rps:.0f} req/s (wrk); handshakes "
                        f"{row.seq_handshakes:.0f}/{row.seq_requests}, "
                        f"{row.wrk_handshakes:.0f}/{row.wrk_requests}"
                    )
            finally:
                bench.stack.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    section = report(rows, args, time.monotonic() - started, load)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_section(args.output, section)
    print(section)
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
