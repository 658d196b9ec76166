"""A real squid for the proxy tests, started as the tests' own child process.

It listens on 127.0.0.1 on a free port with a private ``squid.conf``, pid file, access and
cache logs in one temporary directory; no system service and no system configuration is used
(``tests/ops/setup.sh`` installs the Debian package). Modes:

* ``open``  — CONNECT for anyone on loopback.
* ``basic`` — Basic authentication through ``basic_ncsa_auth`` and a file made by ``htpasswd``.
* ``ntlm``  — NTLM through ``ntlm_fake_auth`` (a real NTLM message exchange whose helper
  accepts any account) and Basic next to it, so the client must pick the stronger scheme.
* ``deny``  — an ACL refuses CONNECT to the ports in ``deny_ports``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

SQUID = shutil.which("squid") or shutil.which("squid", path="/usr/sbin:/sbin")
HELPERS = Path("/usr/lib/squid")
HTPASSWD = shutil.which("htpasswd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def available() -> str | None:
    """Why squid can't run here, or None when it can."""
    if SQUID is None:
        return "squid is not installed (bash tests/ops/setup.sh)"
    if HTPASSWD is None:
        return "htpasswd is not installed (bash tests/ops/setup.sh)"
    return None


class Squid:
    def __init__(
        self,
        mode: str = "open",
        users: dict[str, str] | None = None,
        deny_ports: Sequence[int] = (),
    ) -> None:
        # Directly under /tmp, not in pytest's 0700 tree: squid drops to the proxy user.
        self.root = Path(tempfile.mkdtemp(prefix="backhaul-squid-"))
        self.mode = mode
        self.users = users or {}
        self.deny_ports = list(deny_ports)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    def _config(self) -> str:
        lines = [
            f"http_port 127.0.0.1:{self.port}",
            f"pid_filename {self.root / 'squid.pid'}",
            f"cache_log {self.root / 'cache.log'}",
            f"access_log stdio:{self.access_log}",
            f"coredump_dir {self.root}",
            "cache deny all",
            "pinger_enable off",
            "shutdown_lifetime 0 seconds",
            "acl CONNECT method CONNECT",
            "acl to_loopback dst 127.0.0.0/8",
        ]
        if os.geteuid() == 0:
            lines.append("cache_effective_user proxy")
        if self.deny_ports:
            ports = " ".join(str(p) for p in self.deny_ports)
            lines += [f"acl blocked port {ports}", "http_access deny CONNECT blocked"]
        if self.mode == "basic":
            lines += [
                f"auth_param basic program {HELPERS / 'basic_ncsa_auth'} {self.root / 'passwd'}",
                "auth_param basic realm backhaul-test",
                "auth_param basic children 2 startup=1 idle=1",
            ]
        if self.mode == "ntlm":
            lines += [
                f"auth_param ntlm program {HELPERS / 'ntlm_fake_auth'}",
                "auth_param ntlm children 2 startup=1 idle=1",
                f"auth_param basic program {HELPERS / 'basic_ncsa_auth'} {self.root / 'passwd'}",
                "auth_param basic realm backhaul-test",
                "auth_param basic children 1 startup=1 idle=1",
            ]
        if self.mode in ("basic", "ntlm"):
            lines += ["acl authed proxy_auth REQUIRED", "http_access allow authed"]
        else:
            lines += ["http_access allow localhost"]
        lines.append("http_access deny all")
        return "\n".join(line for line in lines if line) + "\n"

    def start(self) -> Squid:
        assert SQUID is not None
        if self.mode in ("basic", "ntlm"):
            passwd = self.root / "passwd"
            passwd.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    [str(HTPASSWD), "-b", "-B", str(passwd), user, password],
                    check=True,
                    capture_output=True,
                )
        (self.root / "squid.conf").write_text(self._config())
        if os.geteuid() == 0:
            proxy = pwd.getpwnam("proxy")
            for path in [self.root, *self.root.iterdir()]:
                os.chown(path, proxy.pw_uid, proxy.pw_gid)
        out = (self.root / "squid.out").open("wb")
        self.proc = subprocess.Popen(
            [SQUID, "-f", str(self.root / "squid.conf"), "-N", "-d1"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"squid exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"squid did not listen on {self.port}:\n{self.log()}")

    def log(self) -> str:
        text = ""
        for name in ("squid.out", "cache.log"):
            path = self.root / name
            if path.exists():
                text += path.read_text(errors="replace")[-3000:]
        return text

    def access(self) -> str:
        """The access log (squid writes it as requests finish)."""
        return self.access_log.read_text() if self.access_log.exists() else ""

    def stop(self) -> None:
        """Kill squid and its helpers (the whole process group): it has nothing to save, and
        a graceful shutdown waits seconds for connections to drain."""
        if self.proc is None:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Squid:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
