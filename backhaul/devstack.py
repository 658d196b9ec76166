"""A whole Backhaul on one machine, from real processes: relay (dev TLS, SQLite), the sample
internal API, an enrolled agent. Used by ``make demo``, the end-to-end tests and the
benchmark, so all three drive the product exactly as an operator would: through its
commands and its HTTP API.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import tomli_w

from backhaul import sampleapi


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(name: str) -> str:
    """Path of one of our console scripts, next to the running interpreter first."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (pip install -e .)")
    return found


def read_agent_status(
    config_dir: Path, environ: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """The status document of the agent of ``config_dir``, read from its status socket in
    this process (plain blocking I/O), or None when no agent answers there. Tests poll it
    every 0.1 s: starting ``backhaul-agent status`` each time would take the CPU that the
    agent they wait for is starting with."""
    from agent.config import load_config
    from backhaul.errors import BackhaulError

    try:
        socket_path = load_config(config_dir, environ or {}).status.socket
    except BackhaulError:
        return None
    transport = httpx.HTTPTransport(uds=str(socket_path))
    try:
        with httpx.Client(transport=transport, timeout=5.0, trust_env=False) as client:
            response = client.get("http://agent/status")
        doc = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class StackError(RuntimeError):
    """A process of the stack failed to start or answer; the message says which and why."""


class DevStack:
    """Start, drive and stop the processes; a context manager that always cleans up."""

    def __init__(self, root: Path, *, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("BACKHAUL_LOG_FORMAT", "json")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []
        self.relay_url = ""
        self.relays: dict[str, str] = {}
        self.relay_dir = root / "relay"
        self.ca_file = self.relay_dir / "tls" / "relay.crt"
        self.admin_token = ""
        self.api: sampleapi.SampleAPIProcess | None = None
        #: Gateway id → the recovery key its first member printed (or was given).
        self.recovery_keys: dict[str, str] = {}

    # -- lifecycle

    def __enter__(self) -> DevStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        self._files.append(log)
        proc = subprocess.Popen(  # noqa: S603 - our own commands
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        self.procs[name] = proc
        return proc

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop(self) -> None:
        for name in list(self.procs):
            self.stop_process(name, timeout=10)
        if self.api is not None:
            self.api.stop()
            self.api = None
        for log in self._files:
            log.close()
        self._files.clear()

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- relay

    def start_relay(
        self, port: int | None = None, extra: Sequence[str] = (), name: str = "relay"
    ) -> str:
        """Start a relay process; the first one started is the stack's default relay."""
        port = port or free_port()
        url = f"https://127.0.0.1:{port}"
        self.relays[name] = url
        if not self.relay_url or name == "relay":
            self.relay_url = url
        argv = [command("backhaul-relay"), "serve", "--dev", "--data-dir", str(self.relay_dir)]
        self.spawn(name, [*argv, "--listen", f"127.0.0.1:{port}", *extra])
        self._wait(lambda: self._healthy(url), name, 30)
        return url

    def _healthy(self, url: str) -> bool:
        if not self.ca_file.exists():
            return False
        try:
            return httpx.get(f"{url}/healthz", verify=self.tls()).status_code == 200
        except httpx.HTTPError:
            return False

    def tls(self) -> ssl.SSLContext:
        """A client TLS context trusting the relay's development CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def create_user(self, name: str, role: str = "user") -> tuple[str, str]:
        """A user made by the admin: (id, token)."""
        doc = self.call("POST", "/v1/users", json={"name": name, "role": role})
        return doc["id"], doc["token"]

    def create_admin(self, name: str = "admin") -> str:
        out = subprocess.run(  # noqa: S603
            [command("backhaul-relay"), "create-admin", name, "--data-dir", str(self.relay_dir)],
            check=True,
            capture_output=True,
            env=self.env,
        )
        self.admin_token = out.stdout.decode().strip()
        return self.admin_token

    def client(
        self, token: str | None = None, timeout: float = 60, relay: str | None = None
    ) -> httpx.Client:
        return httpx.Client(
            base_url=self.relays[relay] if relay else self.relay_url,
            verify=self.tls(),
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=timeout,
        )

    async def get_many(
        self, path: str, count: int, request_timeout: float = 120
    ) -> list[httpx.Response | BaseException]:
        """``count`` concurrent GETs of ``path`` on the relay as the admin, each on a
        connection of its own; a request that failed is its exception."""
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(
            base_url=self.relay_url,
            verify=self.tls(),
            headers={"Authorization": f"Bearer {self.admin_token}"},
            limits=limits,
            timeout=request_timeout,
        ) as client:
            return await asyncio.gather(
                *(client.get(path) for _ in range(count)), return_exceptions=True
            )

    def call(self, method: str, path: str, token: str | None = None, **kwargs: Any) -> Any:
        """One API call that must succeed; returns the JSON body."""
        with self.client(token) as client:
            response = client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise StackError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else None

    # -- sample API

    def start_api(
        self, basic: tuple[str, str] | None = None, api_key: tuple[str, str] | None = None
    ) -> str:
        self.api = sampleapi.start_subprocess(
            basic=basic, api_key=api_key, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self.api.url.rstrip("/") + "/"

    # -- agents

    def enroll(
        self,
        gateway_id: str | None = None,
        name: str = "agent",
        allow: Sequence[str] = (),
        *,
        join: bool | None = None,
        recovery_key: str | None = None,
        token: str | None = None,
    ) -> tuple[str, Path]:
        """Create a gateway (unless given) and enroll an agent into it: (gateway id, dir).

        The first member's generated recovery key is kept in ``recovery_keys``; a further
        member (``gateway_id`` given) joins with it unless told otherwise. The key goes to the
        command in its environment, not its argv, as an operator's script should do it.
        """
        if gateway_id is None:
            gateway = self.call("POST", "/v1/gateways", json={"name": f"{name}-gw"})
            gateway_id, token = gateway["id"], gateway["enrollment_token"]
            join = bool(join)
        elif token is None:
            token = self.call("POST", f"/v1/gateways/{gateway_id}/enrollment-tokens")[
                "enrollment_token"
            ]
        join = True if join is None else join
        key = recovery_key or (self.recovery_keys.get(gateway_id) if join else None)
        config_dir = self.root / name
        argv = [command("backhaul-agent"), "enroll", "--relay", self.relay_url, "--token", token]
        argv += ["--ca-file", str(self.ca_file), "--config-dir", str(config_dir), "--name", name]
        for prefix in allow:
            argv += ["--allow", prefix]
        if join:
            argv.append("--join")
        env = {k: v for k, v in self.env.items() if k != "BACKHAUL_RECOVERY_KEY"}
        if key:
            env["BACKHAUL_RECOVERY_KEY"] = key
        done = subprocess.run(argv, capture_output=True, env=env)  # noqa: S603
        if done.returncode != 0:
            raise StackError(f"enroll failed: {done.stdout.decode()} {done.stderr.decode()}")
        if not join:
            printed = re.search(r"\bbhrk_[0-9A-Z]{4}(?:-[0-9A-Z]{4}){13}\b", done.stdout.decode())
            self.recovery_keys[gateway_id] = key or (printed.group(0) if printed else "")
        return gateway_id, config_dir

    def set_agent_config(self, config_dir: Path, **keys: Any) -> None:
        """Change keys of an enrolled agent's agent.toml (e.g. relay_urls)."""
        path = config_dir / "agent.toml"
        doc = tomllib.loads(path.read_text())
        doc.update(keys)
        path.write_text(tomli_w.dumps(doc))

    def start_agent(self, config_dir: Path, name: str | None = None) -> subprocess.Popen[bytes]:
        name = name or config_dir.name
        proc = self.spawn(name, [command("backhaul-agent"), "run", "--config-dir", str(config_dir)])
        self.wait_connected(config_dir, name)
        return proc

    def agent_status(self, config_dir: Path) -> dict[str, Any]:
        """The running agent's status document as ``backhaul-agent status --json`` prints it,
        read in this process (:func:`read_agent_status`)."""
        doc = read_agent_status(config_dir, self.env)
        return {"connected": False, "running": False} if doc is None else {"running": True, **doc}

    def wait_connected(self, config_dir: Path, name: str, timeout: float = 30) -> None:
        self._wait(lambda: bool(self.agent_status(config_dir).get("connected")), name, timeout)

    def _wait(self, check: Any, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise StackError(
                    f"{name} exited ({proc.returncode}):\n{self.log_text(name)[-3000:]}"
                )
            if check():
                return
            time.sleep(0.1)
        raise StackError(f"{name} not ready after {timeout}s:\n{self.log_text(name)[-3000:]}")

    # -- connectors and connections

    def connection(
        self,
        gateway_id: str,
        base_url: str,
        auth_type: str = "none",
        credentials: dict[str, str] | None = None,
        token: str | None = None,
        **connector: Any,
    ) -> str:
        """Create a connector and one connection on it; returns the connection id."""
        body = {"name": "c", "base_url": base_url, "auth_type": auth_type, "gateway_id": gateway_id}
        ctr = self.call("POST", "/v1/connectors", token, json=body | connector)
        cxn = self.call(
            "POST",
            "/v1/connections",
            token,
            json={"connector_id": ctr["id"], "credentials": credentials or {}},
        )
        return str(cxn["id"])


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
