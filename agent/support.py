"""``backhaul-agent logs export``: one zip an operator can attach to a support ticket.

What goes in, all of it redacted::

    manifest.json              when, which agent, what each file is
    versions.json              Backhaul, Python, the OS and the libraries that matter
    status.json                the running agent's status document (or why there is none)
    config/agent.toml          the file as written, secrets masked
    config/effective.json      the configuration after BACKHAUL_AGENT_* overrides, masked
    config/environment.json    BACKHAUL_AGENT_*, HTTPS_PROXY / HTTP_PROXY / NO_PROXY, masked
    config/files.txt           the config directory's file names, modes and sizes (no contents)
    logs/agent.log*            [log] file and its rotated files, newest first, within the cap
    logs/journal.txt           the service's journal (systemd), when there is one
    diagnose.json              with --diagnose: the network test's report

Never in it: the member and gateway private keys (not even their names' contents are read
into the archive), proxy passwords, API or enrollment tokens, Authorization values. Every text
file passes through the same redaction as the logs, and before the zip is written its
contents are checked against the secrets this agent actually holds (the key files' bytes, the
proxy password): a match aborts the export instead of leaking.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

from agent.config import CONFIG_FILE, AgentConfig
from agent.errors import AgentError
from backhaul.logging import REDACTED, redact, redact_text
from backhaul.version import __version__

__all__ = ["ExportError", "export"]

#: Keys whose values are masked in configuration documents (matched as substrings).
_SECRET_KEYS = ("password", "secret", "token", "credential", "private", "recovery")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s:@]+):([^@\s/]*)@")
_ENV_NAMES = frozenset(
    {"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"}
    | {"ALL_PROXY", "all_proxy"}
)
_PACKAGES = [
    *("websockets", "httpx", "h11", "cryptography", "pyspnego", "pydantic", "structlog"),
    *("psutil", "gssapi", "pywin32"),
]
DEFAULT_MAX_LOG_MB = 50


class ExportError(AgentError):
    code = "export_failed"


def mask(text: str) -> str:
    """Redact free text: the log redaction plus passwords in URLs (``user:password@``)."""
    return redact_text(_USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:{REDACTED}@", text))


def _masked(value: Any, key: str = "") -> Any:
    lowered = key.lower()
    if any(part in lowered for part in _SECRET_KEYS) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, dict):
        return {k: _masked(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, key) for v in value]
    if isinstance(value, str):
        return mask(value)
    return value


def _toml_text(doc: dict[str, Any]) -> str:
    import tomli_w

    return tomli_w.dumps(doc)


def _versions() -> dict[str, Any]:
    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    os_release = {}
    release = Path("/etc/os-release")
    if release.exists():
        for line in release.read_text(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and key in ("NAME", "VERSION", "ID", "VERSION_ID", "PRETTY_NAME"):
                os_release[key] = value.strip('"')
    return {
        "backhaul": __version__,
        "python": sys.version,
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "os_release": os_release,
        "packages": packages,
    }


def _listing(config_dir: Path) -> str:
    lines = []
    for path in sorted(config_dir.rglob("*")):
        try:
            info = path.lstat()
        except OSError:
            continue
        kind = "d" if stat.S_ISDIR(info.st_mode) else "s" if stat.S_ISSOCK(info.st_mode) else "-"
        owner = str(info.st_uid)
        try:
            import pwd

            owner = pwd.getpwuid(info.st_uid).pw_name
        except (ImportError, KeyError):
            pass
        rel = path.relative_to(config_dir)
        lines.append(
            f"{kind} {stat.S_IMODE(info.st_mode):04o} {owner:<12} {info.st_size:>10} {rel}"
        )
    return "\n".join(lines) + "\n"


def _log_files(cfg: AgentConfig) -> list[Path]:
    """The log file and its rotated files, newest first."""
    if cfg.log.file is None:
        return []
    base = cfg.log.file
    rotated = (
        sorted(base.parent.glob(base.name + ".*"), reverse=True) if base.parent.exists() else []
    )
    return ([base] if base.exists() else []) + [p for p in rotated if p.is_file()]


def _journal() -> str | None:
    if not Path("/run/systemd/system").is_dir() or shutil.which("journalctl") is None:
        return None
    try:
        done = subprocess.run(
            ["journalctl", "--unit", "backhaul-agent", "--since", "-7 days", "--no-pager"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout[-20 * 1024 * 1024 :] if done.returncode == 0 else None


def _status(cfg: AgentConfig) -> dict[str, Any]:
    from agent.status import fetch_status

    try:
        return {"running": True, **asyncio.run(fetch_status(cfg, 3.0))}
    except AgentError as exc:
        return {"running": False, "error": str(exc)}


def _secrets(cfg: AgentConfig) -> list[bytes]:
    """What must never appear in the archive: key material and passwords held here."""
    found: list[bytes] = []
    for path in (cfg.signing_key_file, cfg.gateway_key_file):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        found += [line.strip() for line in raw.splitlines() if len(line.strip()) >= 16]
    if cfg.proxy.password and len(cfg.proxy.password) >= 4:
        found.append(cfg.proxy.password.encode())
    if cfg.proxy.url:
        from agent.proxy import parse_proxy_url

        _host, _port, _user, password = parse_proxy_url(cfg.proxy.url)
        if password and len(password) >= 4:
            found.append(password.encode())
    for name in ("BACKHAUL_TOKEN", "BACKHAUL_RECOVERY_KEY"):
        value = os.environ.get(name, "")
        if len(value) >= 8:
            found.append(value.encode())
    return found


def export(
    cfg: AgentConfig,
    output: Path,
    *,
    max_log_mb: int = DEFAULT_MAX_LOG_MB,
    with_diagnose: bool = False,
    environ: dict[str, str] | None = None,
) -> list[str]:
    """Write the support zip to ``output``; returns the names of the files it holds."""
    env = dict(os.environ if environ is None else environ)
    members: dict[str, bytes] = {}

    def add(name: str, text: str) -> None:
        members[name] = text.encode("utf-8")

    add("versions.json", json.dumps(_versions(), indent=2))
    add("status.json", mask(json.dumps(_masked(_status(cfg)), indent=2)))
    config_path = cfg.config_dir / CONFIG_FILE
    try:
        raw = tomllib.loads(config_path.read_text())
        add("config/agent.toml", _toml_text(_masked(raw)))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        add("config/agent.toml", f"# could not read {config_path}: {exc}\n")
    effective = cfg.model_dump(mode="json")
    effective["config_dir"] = str(cfg.config_dir)
    add("config/effective.json", json.dumps(_masked(effective), indent=2))
    wanted = {k: v for k, v in env.items() if k.startswith("BACKHAUL_AGENT_") or k in _ENV_NAMES}
    add("config/environment.json", json.dumps(_masked(redact(dict(wanted))), indent=2))
    add("config/files.txt", _listing(cfg.config_dir))
    budget = max_log_mb * 1024 * 1024
    skipped: list[str] = []
    for path in _log_files(cfg):
        size = path.stat().st_size
        if size > budget:
            skipped.append(path.name)
            continue
        budget -= size
        text = path.read_text(encoding="utf-8", errors="replace")
        add(f"logs/{path.name}", "".join(mask(line) for line in text.splitlines(keepends=True)))
    journal = _journal()
    if journal is not None:
        add("logs/journal.txt", mask(journal))
    if with_diagnose:
        from agent.diagnose import diagnose

        report = asyncio.run(diagnose(cfg, environ=env))
        add("diagnose.json", mask(json.dumps(report.to_json(), indent=2)))
    manifest = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "agent_version": __version__,
        "member_id": cfg.member_id,
        "gateway_id": cfg.gateway_id,
        "config_dir": str(cfg.config_dir),
        "files": sorted(members),
        "logs_left_out_over_the_cap": skipped,
        "redacted": "secrets in configuration, environment, status and logs are replaced by "
        f"{REDACTED}; private keys are never included",
    }
    add("manifest.json", json.dumps(manifest, indent=2))
    secrets = _secrets(cfg)
    for name, data in members.items():
        for secret in secrets:
            if secret in data:
                raise ExportError(f"refusing to export: {name} would contain a secret")
    output = output.expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(members):
            archive.writestr(name, members[name])
    os.replace(tmp, output)
    return sorted(members)
