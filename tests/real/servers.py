"""Real Windows-authentication servers for the tests, started as the tests' own processes.

Everything listens on 127.0.0.1 on free high ports and lives in one private temporary
directory; no system service, system configuration file or ``/etc/hosts`` entry is used or
changed. ``tests/real/setup.sh`` installs the Debian packages first.

* :class:`KDC` — an MIT ``krb5kdc`` with its own realm, made with ``kdb5_util create`` and
  filled with ``kadmin.local``: users, the ``HTTP/localhost`` service with a keytab for Apache,
  and a service principal with a client keytab for the agent's own identity. A second KDC of
  another realm can run an hour ahead (under ``faketime``) to produce real clock-skew errors,
  and a third realm points at a port nobody listens on.
* :class:`Apache` — ``apache2 -f <own config> -DFOREGROUND`` with mod_auth_gssapi, over HTTP
  and HTTPS: ``/krb/`` (Negotiate, Kerberos only), ``/ntlm/`` (NTLM through gss-ntlmssp, its
  users in an ``NTLM_USER_FILE``), ``/negotiate/`` (Negotiate offering Kerberos and NTLM) and
  ``/basic/`` (Basic only). Each location serves ``whoami`` (the authenticated user, as JSON,
  from mod_lua) and ``upload.cgi`` (reads the request body as it arrives and answers its length and
  SHA-256).
* :class:`ChannelBindingServer` — ``tests/real/cbserver.py``: HTTPS with pyspnego's NTLM
  acceptor given the certificate's ``tls-server-end-point`` bindings; it refuses a client that
  sends none, zeros or the wrong ones.

Host names: the services are ``localhost``; the realm's krb5.conf turns off reverse DNS and
host-name canonicalization, so the SPN is exactly ``HTTP/localhost`` without any resolver.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime as dt
import hashlib
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REALM = "BACKHAUL.TEST"
SKEW_REALM = "SKEW.TEST"
DEAD_REALM = "DEAD.TEST"
HOST = "localhost"
NTLM_DOMAIN = "BACKHAUL"

#: Users of the main realm: name -> password.
USERS = {"alice": "Alice-pw-42!", "bob": "Bob-pw-43!"}
#: The agent's own service identity, authenticating from a client keytab.
SERVICE_USER = "svc-backhaul"
#: A user of the realm whose KDC runs an hour ahead.
SKEW_USER = ("carol", "Carol-pw-44!")
#: NTLM accounts of the gss-ntlmssp and channel-binding acceptors: (domain, user, password).
NTLM_USERS = [(NTLM_DOMAIN, "alice", USERS["alice"]), (NTLM_DOMAIN, "bob", USERS["bob"])]

SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
HERE = Path(__file__).resolve().parent


class ServerError(RuntimeError):
    """A real server failed to start; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tool(name: str) -> str:
    for directory in SBIN:
        path = Path(directory) / name
        if path.exists():
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise ServerError(f"{name} is not installed; run: bash tests/real/setup.sh")
    return found


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{log.stem} exited ({proc.returncode}):\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise ServerError(f"{log.stem} is not listening on {port} after {timeout}s:\n{tail(log)}")


def _libfaketime() -> str:
    for candidate in sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1")):
        return str(candidate)
    raise ServerError("libfaketime is not installed; run: bash tests/real/setup.sh")


def tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


# -- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(directory: Path) -> PKI:
    """A private CA and a server certificate for localhost / 127.0.0.1 (ECDSA P-256, SHA-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Backhaul test internal CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(HOST), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = PKI(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.key_file.chmod(0o600)
    return pki


# -- processes -----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Children:
    """Processes started here; all of them are stopped (TERM, then KILL) on close."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._files: list[IO[bytes]] = []

    def spawn(
        self, name: str, argv: Sequence[str], env: dict[str, str]
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log_path = self.logs / f"{name}.log"
        log = log_path.open("ab")
        self._files.append(log)
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.procs.append((name, proc))
        return proc, log_path

    def close(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        for log in self._files:
            log.close()
        self._files.clear()


# -- Kerberos ------------------------------------------------------------------------------


@dataclass
class KDC:
    """One MIT KDC process serving one realm from its own database."""

    realm: str
    directory: Path
    port: int = field(default_factory=free_port)
    ahead: str | None = None  # faketime offset, e.g. "+1h"

    @property
    def profile(self) -> Path:
        return self.directory / "kdc.conf"

    def write_profile(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        d = self.directory
        self.profile.write_text(
            f"""[kdcdefaults]
    kdc_listen = 127.0.0.1:{self.port}
    kdc_tcp_listen = 127.0.0.1:{self.port}

[realms]
    {self.realm} = {{
        database_name = {d}/principal
        key_stash_file = {d}/stash
        acl_file = {d}/kadm5.acl
        max_life = 10h
        max_renewable_life = 1d
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }}

[logging]
    kdc = FILE:{d}/kdc-events.log
"""
        )
        (d / "kadm5.acl").write_text("")


class Realm:
    """The krb5.conf every Kerberos program of the tests uses, and the KDCs it names."""

    def __init__(self, directory: Path, children: _Children) -> None:
        self.directory = directory
        self.children = children
        self.kdc = KDC(REALM, directory / "kdc")
        self.skew_kdc = KDC(SKEW_REALM, directory / "kdc-skew", ahead="+1h")
        self.dead_port = free_port()
        self.krb5_conf = directory / "krb5.conf"
        self.http_keytab = directory / "http.keytab"
        self.service_keytab = directory / "service.keytab"

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment for a Kerberos tool or server of this realm."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KRB5")}
        env["KRB5_CONFIG"] = str(self.krb5_conf)
        env.update(extra)
        return env

    def write_krb5_conf(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.krb5_conf.write_text(
            f"""[libdefaults]
    default_realm = {REALM}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    rdns = false
    dns_canonicalize_hostname = false
    # TCP only: a KDC port nobody listens on fails at once instead of after UDP retries.
    udp_preference_limit = 1
    ticket_lifetime = 10h
    forwardable = true
    # Report a KDC whose clock is off instead of silently adopting its time, as AD clients do.
    kdc_timesync = 0

[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{self.kdc.port}
    }}
    {SKEW_REALM} = {{
        kdc = 127.0.0.1:{self.skew_kdc.port}
    }}
    {DEAD_REALM} = {{
        kdc = 127.0.0.1:{self.dead_port}
    }}

[domain_realm]
    {HOST} = {REALM}
"""
        )

    def _kadmin(self, kdc: KDC, *queries: str) -> None:
        env = self.env(KRB5_KDC_PROFILE=str(kdc.profile))
        for query in queries:
            done = subprocess.run(
                [tool("kadmin.local"), "-r", kdc.realm, "-q", query],
                env=env,
                capture_output=True,
                check=False,
            )
            output = (done.stdout + done.stderr).decode(errors="replace")
            if done.returncode != 0 or "error" in output.lower() or "failed" in output.lower():
                command = query.split(" -pw ")[0]
                raise ServerError(f"kadmin.local {command!r} failed:\n{output[-2000:]}")

    def _create(self, kdc: KDC) -> None:
        kdc.write_profile()
        env = self.env(KRB5_KDC_PROFILE=str(kdc.profile))
        done = subprocess.run(
            [tool("kdb5_util"), "create", "-s", "-r", kdc.realm, "-P", "master-key-for-tests"],
            env=env,
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(f"kdb5_util create failed:\n{(done.stdout + done.stderr).decode()}")

    def _start(self, kdc: KDC) -> None:
        env = self.env(KRB5_KDC_PROFILE=str(kdc.profile))
        argv = [tool("krb5kdc"), "-n", "-r", kdc.realm, "-P", str(kdc.directory / "kdc.pid")]
        if kdc.ahead is not None:
            # libfaketime preloaded into the KDC itself (not the faketime wrapper, which would
            # sit between us and the KDC): the KDC's clock runs ahead, nothing else's does.
            env.update(LD_PRELOAD=_libfaketime(), FAKETIME=kdc.ahead, DONT_FAKE_MONOTONIC="1")
        proc, log = self.children.spawn(f"krb5kdc-{kdc.realm.lower()}", argv, env)
        wait_port(kdc.port, proc, log)

    def start(self) -> None:
        self.write_krb5_conf()
        self._create(self.kdc)
        # Pre-authentication required, as in Active Directory: the KDC checks the password (and
        # the client's clock) before it answers.
        users = [f"addprinc +requires_preauth -pw {pw} {name}" for name, pw in USERS.items()]
        self._kadmin(
            self.kdc,
            *users,
            f"addprinc -randkey HTTP/{HOST}",
            f"ktadd -k {self.http_keytab} HTTP/{HOST}",
            f"addprinc -randkey {SERVICE_USER}",
            f"ktadd -k {self.service_keytab} {SERVICE_USER}",
        )
        self._start(self.kdc)
        self._create(self.skew_kdc)
        self._kadmin(self.skew_kdc, f"addprinc +requires_preauth -pw {SKEW_USER[1]} {SKEW_USER[0]}")
        self._start(self.skew_kdc)

    def kinit_check(self) -> None:
        """Prove the KDC answers: a password kinit into a throwaway memory cache."""
        name, password = next(iter(USERS.items()))
        done = subprocess.run(
            [tool("kinit"), "-c", "MEMORY:check", f"{name}@{REALM}"],
            input=(password + "\n").encode(),
            env=self.env(),
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(f"kinit against the test KDC failed: {done.stderr.decode()}")


# -- Apache --------------------------------------------------------------------------------

_MODULES = [
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authn_core_module", "mod_authn_core.so"),
    ("authn_file_module", "mod_authn_file.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("authz_user_module", "mod_authz_user.so"),
    ("authz_host_module", "mod_authz_host.so"),
    ("auth_basic_module", "mod_auth_basic.so"),
    ("auth_gssapi_module", "mod_auth_gssapi.so"),
    ("alias_module", "mod_alias.so"),
    ("mime_module", "mod_mime.so"),
    ("lua_module", "mod_lua.so"),
    ("cgid_module", "mod_cgid.so"),
    ("env_module", "mod_env.so"),
    ("headers_module", "mod_headers.so"),
    ("socache_shmcb_module", "mod_socache_shmcb.so"),
    ("ssl_module", "mod_ssl.so"),
]

WHOAMI = """-- The authenticated user as JSON (mod_lua: cheap enough for the benchmark).
local function quote(text)
  return (text or ""):gsub("\\\\", "\\\\\\\\"):gsub('"', '\\\\"')
end

function handle(r)
  r.content_type = "application/json"
  r:puts(string.format('{"user": "%s", "auth_type": "%s", "https": "%s"}\\n',
    quote(r.user), quote(r.ap_auth_type), r.is_https and "on" or "(none)"))
  return apache2.OK
end
"""

UPLOAD_CGI = """#!/usr/bin/python3
import hashlib, json, os, sys
digest = hashlib.sha256()
size = 0
stdin = sys.stdin.buffer
while True:
    chunk = stdin.read(1 << 20)
    if not chunk:
        break
    size += len(chunk)
    digest.update(chunk)
sys.stdout.write("Content-Type: application/json\\r\\n\\r\\n")
sys.stdout.write(json.dumps({
    "user": os.environ.get("REMOTE_USER", ""),
    "auth_type": os.environ.get("AUTH_TYPE", ""),
    "method": os.environ.get("REQUEST_METHOD", ""),
    "bytes": size,
    "sha256": digest.hexdigest(),
}))
"""


class Apache:
    """Apache httpd with mod_auth_gssapi, on its own config, ports and directories."""

    def __init__(self, directory: Path, realm: Realm, pki: PKI, children: _Children) -> None:
        self.directory = directory
        self.realm = realm
        self.pki = pki
        self.children = children
        self.http_port = free_port()
        self.https_port = free_port()
        self.conf = directory / "httpd.conf"
        self.access_log = directory / "logs" / "access.log"
        self.ntlm_user_file = directory / "ntlm-users"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}/"

    @property
    def https_url(self) -> str:
        return f"https://{HOST}:{self.https_port}/"

    def _user(self) -> tuple[str, str] | None:
        """Apache refuses to serve as root: its children run as www-data when we are root."""
        if os.geteuid() != 0:
            return None
        for name in ("www-data", "daemon", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return name, str(entry.pw_gid)
        raise ServerError("no unprivileged user (www-data) for Apache's children")

    def write(self) -> None:
        d = self.directory
        for sub in ("logs", "run", "api", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "api" / "whoami").write_text(WHOAMI)
        cgi = d / "api" / "upload.cgi"
        cgi.write_text(UPLOAD_CGI)
        cgi.chmod(0o755)
        (d / "htpasswd").write_text(_htpasswd(USERS))
        self.ntlm_user_file.write_text(
            "".join(f"{dom}:{user}:{pw}\n" for dom, user, pw in NTLM_USERS)
        )
        keytab = d / "http.keytab"
        shutil.copyfile(self.realm.http_keytab, keytab)
        user = self._user()
        if user is not None:
            uid = pwd.getpwnam(user[0]).pw_uid
            gid = int(user[1])
            for path in (keytab, self.ntlm_user_file, d / "htpasswd", d / "tmp"):
                os.chown(path, uid, gid)
            keytab.chmod(0o600)
            self.ntlm_user_file.chmod(0o600)
        modules = "\n".join(
            f"LoadModule {name} /usr/lib/apache2/modules/{so}" for name, so in _MODULES
        )
        user_lines = f"User {user[0]}\nGroup #{user[1]}" if user else ""
        gss_common = f"""    AuthName "Backhaul tests"
        GssapiCredStore keytab:{keytab}
        GssapiCredStore ccache:MEMORY:apache
        GssapiSSLonly Off
        GssapiBasicAuth Off
        GssapiConnectionBound On
        GssapiPublishErrors On
        Require valid-user"""
        self.conf.write_text(
            f"""ServerRoot "{d}"
ServerName {HOST}
PidFile "{d}/run/httpd.pid"
DefaultRuntimeDir "{d}/run"
Mutex file:{d}/run default
ScriptSock "{d}/run/cgid.sock"
Listen 127.0.0.1:{self.http_port}
Listen 127.0.0.1:{self.https_port} https
{modules}
{user_lines}
ErrorLog "{d}/logs/error.log"
LogLevel warn auth_gssapi:info
LogFormat "%h %u \\"%r\\" %>s %I %{{Authorization}}i" withauth
CustomLog "{self.access_log}" withauth
TypesConfig /etc/mime.types
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 30
StartServers 1
ServerLimit 2
ThreadsPerChild 64
MaxRequestWorkers 128
LimitRequestBody 0
Timeout 120

SSLEngine off
SSLSessionCache "shmcb:{d}/run/ssl_scache(512000)"
<VirtualHost 127.0.0.1:{self.https_port}>
    SSLEngine on
    SSLCertificateFile "{self.pki.cert_file}"
    SSLCertificateKeyFile "{self.pki.key_file}"
</VirtualHost>

<Directory />
    AllowOverride None
    Require all denied
</Directory>
<Directory "{d}/api">
    Options +ExecCGI
    AddHandler cgi-script .cgi
    <Files "whoami">
        SetHandler lua-script
    </Files>
    Require all granted
</Directory>
AliasMatch "^/(?:krb|ntlm|negotiate|basic|open)/(.*)$" "{d}/api/$1"

<Location /krb/>
    AuthType GSSAPI
{gss_common}
    GssapiAllowedMech krb5
</Location>

<Location /ntlm/>
    AuthType GSSAPI
{gss_common}
    GssapiAllowedMech ntlmssp
    GssapiAcceptorName HTTP@{HOST}
</Location>

<Location /negotiate/>
    AuthType GSSAPI
{gss_common}
    GssapiAllowedMech krb5
    GssapiAllowedMech ntlmssp
    GssapiAcceptorName HTTP@{HOST}
</Location>

<Location /basic/>
    AuthType Basic
    AuthName "Backhaul tests"
    AuthBasicProvider file
    AuthUserFile "{d}/htpasswd"
    Require valid-user
</Location>
"""
        )

    def start(self) -> None:
        self.write()
        env = self.realm.env(
            NTLM_USER_FILE=str(self.ntlm_user_file),
            KRB5_KTNAME=str(self.directory / "http.keytab"),
            KRB5CCNAME="MEMORY:apache",
            LANG="C",
        )
        argv = [tool("apache2"), "-f", str(self.conf), "-DFOREGROUND"]
        check = subprocess.run([*argv[:-1], "-t"], env=env, capture_output=True, check=False)
        if check.returncode != 0:
            raise ServerError(f"apache2 -t: {(check.stdout + check.stderr).decode()}")
        proc, log = self.children.spawn("apache", argv, env)
        wait_port(self.http_port, proc, log)
        wait_port(self.https_port, proc, log)

    def requests_logged(self, marker: str = "") -> list[str]:
        """Access-log lines (``%h %u "%r" %>s <bytes received> <Authorization>``) with marker."""
        try:
            lines = self.access_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if marker in line]


def _htpasswd(users: dict[str, str]) -> str:
    """An htpasswd file in Apache's ``{SHA}`` form, made without the htpasswd tool."""
    return "".join(
        f"{name}:{{SHA}}{base64.b64encode(hashlib.sha1(pw.encode()).digest()).decode()}\n"
        for name, pw in users.items()
    )


# -- the channel-binding server ------------------------------------------------------------


class ChannelBindingServer:
    """``tests/real/cbserver.py`` as a child process: NTLM that requires channel bindings."""

    def __init__(self, directory: Path, pki: PKI, children: _Children) -> None:
        self.directory = directory
        self.pki = pki
        self.children = children
        self.port = free_port()
        self.user_file = directory / "ntlm-users"

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}/"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.user_file.write_text("".join(f"{d}:{u}:{p}\n" for d, u, p in NTLM_USERS))
        self.user_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KRB5")}
        env["NTLM_USER_FILE"] = str(self.user_file)
        argv = [sys.executable, str(HERE / "cbserver.py"), "--port", str(self.port)]
        argv += ["--cert", str(self.pki.cert_file), "--key", str(self.pki.key_file)]
        proc, log = self.children.spawn("cbserver", argv, env)
        wait_port(self.port, proc, log)


# -- all of them ---------------------------------------------------------------------------


class RealServers:
    """KDCs, Apache and the channel-binding server; a context manager that always cleans up."""

    def __init__(self, root: Path | None = None, *, keep: bool = False) -> None:
        self._owned = root is None
        # Apache's children (www-data) must reach the directory, so it is not a pytest tmp_path
        # (mode 0700 under root's): a private mkdtemp made traversable, removed on close.
        self.root = root or Path(tempfile.mkdtemp(prefix="backhaul-real-"))
        self.root.chmod(0o755)
        self.keep = keep
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children = _Children(self.logs)
        self.pki = make_pki(self.root / "pki")
        self.realm = Realm(self.root / "krb", self.children)
        self.apache = Apache(self.root / "apache", self.realm, self.pki, self.children)
        self.cbserver = ChannelBindingServer(self.root / "cb", self.pki, self.children)

    def start(self) -> RealServers:
        try:
            self.realm.start()
            self.realm.kinit_check()
            self.apache.start()
            self.cbserver.start()
        except BaseException:
            self.close()
            raise
        return self

    def agent_env(self, **extra: str) -> dict[str, str]:
        """What an agent needs to use this realm (its keytab identity included)."""
        env = {
            "KRB5_CONFIG": str(self.realm.krb5_conf),
            "KRB5_CLIENT_KTNAME": str(self.realm.service_keytab),
            "KRB5CCNAME": "MEMORY:backhaul-agent",
        }
        env.update(extra)
        return env

    def log_text(self, name: str) -> str:
        return tail(self.logs / f"{name}.log", 20000)

    def close(self) -> None:
        self.children.close()
        if self._owned and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RealServers:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _main(argv: Sequence[str]) -> int:
    """``python tests/real/servers.py``: start everything and wait, for trying things by hand."""
    del argv
    with RealServers(keep=True) as servers:
        print(f"root      {servers.root}")
        print(f"krb5.conf {servers.realm.krb5_conf}")
        print(f"apache    {servers.apache.http_url}  {servers.apache.https_url}")
        print(f"cbserver  {servers.cbserver.url}")
        print(f"ca        {servers.pki.ca_file}")
        print("Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
