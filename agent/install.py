"""``backhaul-agent install-service`` / ``uninstall-service``: run the agent as a system service.

Linux (systemd): a hardened unit (its own ``backhaul`` account, ``ProtectSystem=strict``, no
capabilities, a system-call filter, state in ``/var/lib/backhaul`` through ``StateDirectory=``),
a sysusers.d entry that creates the account (``systemd-sysusers``; ``useradd`` where that tool
is missing), then ``systemctl enable``. The unit shipped as
``packaging/systemd/backhaul-agent.service`` is :func:`unit_text` with the defaults.

Every change is first written down as a :class:`Plan` — files with their modes, commands — so
``--dry-run`` prints exactly what would happen, and ``--root DIR`` applies it to another file
system tree (an image being built, or a test's temporary directory), the way
``systemctl --root`` and ``systemd-sysusers --root`` do.

Windows: :mod:`agent.winservice` registers a service through pywin32 with the same commands.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from agent.errors import AgentError

__all__ = [
    "DEFAULT_CONFIG_DIR",
    "SERVICE_NAME",
    "Plan",
    "apply",
    "default_executable",
    "install_plan",
    "uninstall_plan",
    "unit_text",
]

SERVICE_NAME = "backhaul-agent"
UNIT_FILE = PurePosixPath("/etc/systemd/system/backhaul-agent.service")
SYSUSERS_FILE = PurePosixPath("/etc/sysusers.d/backhaul-agent.conf")
ENV_FILE = PurePosixPath("/etc/default/backhaul-agent")
DEFAULT_CONFIG_DIR = PurePosixPath("/var/lib/backhaul")
DEFAULT_USER = "backhaul"
DEFAULT_EXECUTABLE = "/usr/local/bin/backhaul-agent"
#: systemd's own directories are used when the config dir is the default.
STATE_DIRECTORY = "backhaul"


class InstallError(AgentError):
    code = "install_failed"


def unit_text(
    executable: str = DEFAULT_EXECUTABLE,
    config_dir: str = str(DEFAULT_CONFIG_DIR),
    user: str = DEFAULT_USER,
) -> str:
    """The systemd unit. Hardening follows systemd.exec(5); each relaxation says why."""
    protect_home = "yes"
    if executable.startswith(("/home/", "/root/", "/run/user/")):
        protect_home = "read-only"  # the agent itself is installed under a home directory
    writable = ""
    if PurePosixPath(config_dir) != DEFAULT_CONFIG_DIR:
        writable = f"ReadWritePaths={config_dir}\n"
    return f"""\
# Backhaul agent: keeps one outbound TLS tunnel to the relay and calls the internal APIs
# its allow-list permits. Written by `backhaul-agent install-service`; see
# docs/operator-guide.md. Local changes: `systemctl edit backhaul-agent`.
[Unit]
Description=Backhaul on-premises gateway agent
Documentation=man:systemd.exec(5)
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=exec
User={user}
Group={user}
ExecStart={executable} run --config-dir {config_dir}
# Proxy variables (HTTPS_PROXY, NO_PROXY) and BACKHAUL_AGENT_* overrides go here.
EnvironmentFile=-{ENV_FILE}
Environment=BACKHAUL_AGENT_LOG__FORMAT=json
Restart=on-failure
RestartSec=10s
# SIGTERM drains: in-flight requests get [tunnel] shutdown_grace_seconds (30 s by default).
TimeoutStopSec=45s
StateDirectory={STATE_DIRECTORY}
StateDirectoryMode=0700
LogsDirectory={STATE_DIRECTORY}
LogsDirectoryMode=0750
WorkingDirectory=-{config_dir}
{writable}UMask=0077

# Sandbox: the agent needs outbound TCP, its state directory and nothing else.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
KeyringMode=private
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources @mount @swap @reboot @obsolete
SystemCallErrorNumber=EPERM
# MemoryDenyWriteExecute is left off: libffi closures (cffi, under cryptography) may need
# writable and executable memory.

[Install]
WantedBy=multi-user.target
"""


def sysusers_text(user: str = DEFAULT_USER, home: str = str(DEFAULT_CONFIG_DIR)) -> str:
    return (
        "# The Backhaul agent's service account (sysusers.d(5)); written by install-service.\n"
        f'u {user} - "Backhaul agent" {home} /usr/sbin/nologin\n'
    )


def default_executable() -> str:
    """The ``backhaul-agent`` being run now (so the unit starts this very installation)."""
    beside = Path(sys.executable).parent / SERVICE_NAME
    if beside.exists():
        return str(beside.absolute())
    found = shutil.which(SERVICE_NAME)
    return str(Path(found).absolute()) if found else DEFAULT_EXECUTABLE


@dataclass
class FileChange:
    path: PurePosixPath
    content: str | None  # None: remove
    mode: int = 0o644


@dataclass
class Plan:
    """What install/uninstall will do: files first, then commands, then notes to print."""

    root: Path | None
    files: list[FileChange] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    chown: list[tuple[PurePosixPath, str]] = field(default_factory=list)
    remove_trees: list[PurePosixPath] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def real(self, path: PurePosixPath) -> Path:
        """``path`` inside ``--root`` (or as is)."""
        if self.root is None:
            return Path(path)
        return self.root / path.relative_to("/")

    def describe(self) -> list[str]:
        lines = []
        for change in self.files:
            where = self.real(change.path)
            if change.content is None:
                lines.append(f"remove {where}")
            else:
                lines.append(f"write {where} (mode {change.mode:04o})")
        for path, user in self.chown:
            lines.append(f"chown -R {user}: {self.real(path)}")
        for tree in self.remove_trees:
            lines.append(f"remove {self.real(tree)} and everything in it")
        lines += ["run " + " ".join(command) for command in self.commands]
        return lines


def _systemd_running(root: Path | None) -> bool:
    return root is None and Path("/run/systemd/system").is_dir()


def _systemctl(root: Path | None, *args: str) -> list[str]:
    return ["systemctl", *(["--root", str(root)] if root else []), *args]


def install_plan(
    *,
    config_dir: str = str(DEFAULT_CONFIG_DIR),
    user: str = DEFAULT_USER,
    executable: str | None = None,
    root: Path | None = None,
    enable: bool = True,
    start: bool = True,
) -> Plan:
    if not PurePosixPath(config_dir).is_absolute():
        raise InstallError(f"--config-dir must be an absolute path, not {config_dir}")
    plan = Plan(root)
    exe = executable or default_executable()
    plan.files.append(FileChange(UNIT_FILE, unit_text(exe, config_dir, user)))
    plan.files.append(FileChange(SYSUSERS_FILE, sysusers_text(user, config_dir)))
    sysusers = shutil.which("systemd-sysusers")
    if sysusers:
        sysusers_args = ["--root", str(root)] if root else []
        plan.commands.append([sysusers, *sysusers_args, str(plan.real(SYSUSERS_FILE))])
    elif root is None:
        plan.commands.append(
            [
                *("useradd", "--system", "--user-group", "--home-dir", config_dir),
                *("--no-create-home", "--shell", "/usr/sbin/nologin", user),
            ]
        )
    else:
        plan.notes.append("systemd-sysusers is missing: create the account when the image boots")
    if plan.real(PurePosixPath(config_dir)).exists():
        plan.chown.append((PurePosixPath(config_dir), user))
    else:
        plan.notes.append(
            f"{config_dir} holds no enrollment yet: run `backhaul-agent enroll --config-dir "
            f"{config_dir} ...` as root, then install-service again (it hands the directory to "
            f"{user})"
        )
    if _systemd_running(root):
        plan.commands.append(_systemctl(root, "daemon-reload"))
    if enable:
        plan.commands.append(_systemctl(root, "enable", f"{SERVICE_NAME}.service"))
    if start and _systemd_running(root):
        plan.commands.append(_systemctl(root, "restart", f"{SERVICE_NAME}.service"))
    elif start:
        plan.notes.append(
            f"systemd is not running here: the service starts at the next boot "
            f"(or `systemctl start {SERVICE_NAME}` once it runs)"
        )
    if exe.startswith(("/home/", "/root/")):
        plan.notes.append(f"{exe} is under a home directory: the unit uses ProtectHome=read-only")
    return plan


def uninstall_plan(
    *, root: Path | None = None, purge: bool = False, user: str = DEFAULT_USER
) -> Plan:
    plan = Plan(root)
    if _systemd_running(root):
        plan.commands.append(_systemctl(root, "disable", "--now", f"{SERVICE_NAME}.service"))
    else:
        plan.commands.append(_systemctl(root, "disable", f"{SERVICE_NAME}.service"))
    plan.files.append(FileChange(UNIT_FILE, None))
    if _systemd_running(root):
        plan.commands.append(_systemctl(root, "daemon-reload"))
    if purge:
        plan.files.append(FileChange(SYSUSERS_FILE, None))
        plan.remove_trees += [DEFAULT_CONFIG_DIR, PurePosixPath("/var/log/backhaul")]
        if root is None:
            plan.commands.append(["userdel", user])
        plan.notes.append("the enrollment (keys) is gone: this machine must enroll again")
    else:
        plan.notes.append(
            f"kept: the enrollment in {DEFAULT_CONFIG_DIR}, the logs and the {user} account "
            "(--purge removes them)"
        )
    return plan


def _chown_tree(path: Path, user: str, root: Path | None) -> None:
    if os.geteuid() != 0:
        raise InstallError(f"{path} must belong to {user}: run install-service as root")
    entry = _lookup(user, root)
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, entry[0], entry[1])
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), entry[0], entry[1], follow_symlinks=False)


def _lookup(user: str, root: Path | None) -> tuple[int, int]:
    """(uid, gid) of ``user`` in the target tree's /etc/passwd (the system's without --root)."""
    if root is None:
        import pwd

        record = pwd.getpwnam(user)
        return record.pw_uid, record.pw_gid
    for line in (root / "etc/passwd").read_text().splitlines():
        parts = line.split(":")
        if len(parts) >= 4 and parts[0] == user:
            return int(parts[2]), int(parts[3])
    raise InstallError(f"no account {user} in {root / 'etc/passwd'}")


def apply(plan: Plan) -> None:
    """Carry the plan out; a failed command stops it with that command's own message."""
    for change in plan.files:
        target = plan.real(change.path)
        if change.content is None:
            target.unlink(missing_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(change.content)
        os.chmod(tmp, change.mode)
        os.replace(tmp, target)
    owned = list(plan.chown)
    for command in plan.commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        except FileNotFoundError:
            raise InstallError(f"{command[0]} is not installed") from None
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip()
            raise InstallError(f"`{' '.join(command)}` failed ({done.returncode}): {output}")
        if command and command[0].endswith(("systemd-sysusers", "useradd")):
            for path, user in owned:
                _chown_tree(plan.real(path), user, plan.root)
            owned = []
    for path, user in owned:
        _chown_tree(plan.real(path), user, plan.root)
    for tree in plan.remove_trees:
        shutil.rmtree(plan.real(tree), ignore_errors=True)
