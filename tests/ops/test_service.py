"""The systemd service: the real unit checked by ``systemd-analyze verify`` and its offline
security score, and ``install-service`` / ``uninstall-service`` applied to a private root with
the real ``systemd-sysusers`` and ``systemctl --root``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.install import DEFAULT_EXECUTABLE, default_executable, sysusers_text, unit_text
from backhaul.devstack import command

REPO = Path(__file__).resolve().parents[2]
PACKAGED = REPO / "packaging" / "systemd" / "backhaul-agent.service"
ANALYZE = shutil.which("systemd-analyze")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [command("backhaul-agent"), *args], capture_output=True, text=True, timeout=60
    )


def test_packaged_unit_is_what_install_service_writes() -> None:
    assert PACKAGED.read_text() == unit_text()
    assert PACKAGED.with_suffix(".sysusers").read_text() == sysusers_text()


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if ANALYZE is None:
        pytest.fail("systemd-analyze is missing (bash tests/ops/setup.sh)")
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60)


def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = tmp_path / "backhaul-agent.service"
    # The packaged unit, with ExecStart pointing at this installation (verify checks it).
    unit.write_text(PACKAGED.read_text().replace(DEFAULT_EXECUTABLE, default_executable()))
    done = analyze("verify", str(unit))
    assert done.returncode == 0, done.stderr
    assert "Unknown" not in done.stderr and "ignoring" not in done.stderr, done.stderr
    text = unit.read_text()
    for line in (
        "User=backhaul",
        "ProtectSystem=strict",
        "StateDirectory=backhaul",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "PrivateTmp=yes",
        "SystemCallFilter=@system-service",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.MULTILINE), line
    assert "--config-dir /var/lib/backhaul" in text
    security = analyze("security", "--offline=true", str(unit))
    score = re.search(r"Overall exposure level for .*: (\d+\.\d+)", security.stdout)
    assert score is not None, security.stdout + security.stderr
    assert float(score.group(1)) < 2.0, security.stdout[-2000:]
    # A mistake is caught: the same check flags a bad key.
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    assert "Unknown key" in analyze("verify", str(broken)).stderr


def test_install_and_uninstall_into_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    state = root / "var/lib/backhaul"
    (state / "keys").mkdir(parents=True)
    (state / "agent.toml").write_text('relay_url = "https://relay.example.com"\n')
    (state / "keys/member.key").write_text("x\n")
    exe = default_executable()

    dry = cli("install-service", "--root", str(root), "--executable", exe, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would write" in dry.stdout and "would run" in dry.stdout
    assert not (root / "etc").exists()

    done = cli("install-service", "--root", str(root), "--executable", exe)
    assert done.returncode == 0, done.stdout + done.stderr
    unit = root / "etc/systemd/system/backhaul-agent.service"
    assert unit.read_text() == unit_text(exe)
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    wants = root / "etc/systemd/system/multi-user.target.wants/backhaul-agent.service"
    assert wants.is_symlink() and os.readlink(wants) == "/etc/systemd/system/backhaul-agent.service"
    passwd = (root / "etc/passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("backhaul:"))
    _name, _x, uid, gid, _gecos, home, shell = entry.split(":")
    assert (home, shell) == ("/var/lib/backhaul", "/usr/sbin/nologin")
    if os.geteuid() == 0:
        # The enrolled directory now belongs to the service account.
        for path in (state, state / "keys", state / "keys/member.key"):
            assert (path.stat().st_uid, path.stat().st_gid) == (int(uid), int(gid))
    assert analyze("verify", str(unit)).returncode == 0

    done = cli("uninstall-service", "--root", str(root))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not unit.exists() and not wants.exists()
    assert (state / "agent.toml").exists()  # the enrollment is kept
    done = cli("uninstall-service", "--root", str(root), "--purge")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not state.exists()


def test_relative_config_dir_is_refused(tmp_path: Path) -> None:
    done = cli("install-service", "--root", str(tmp_path), "--config-dir", "agent", "--dry-run")
    assert done.returncode == 1
    assert "must be an absolute path" in done.stderr


def test_unit_for_a_home_installation_and_another_config_dir() -> None:
    text = unit_text("/home/ops/venv/bin/backhaul-agent", "/srv/backhaul", "svc")
    assert "ProtectHome=read-only" in text
    assert "ReadWritePaths=/srv/backhaul" in text
    assert "User=svc" in text and "ExecStart=/home/ops/venv/bin/backhaul-agent run" in text
