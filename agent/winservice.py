"""The agent as a Windows service, through pywin32 (``pip install 'backhaul[agent]'`` pulls it
in on Windows).

``backhaul-agent install-service --config-dir C:\\ProgramData\\Backhaul`` registers the service
``BackhaulAgent`` (automatic, delayed start; restarts after a failure) hosted by pywin32's
``pythonservice.exe``; the config directory is stored as the service's custom option.
``uninstall-service`` stops and removes it. The Service Control Manager's stop request sets the
same event SIGTERM sets on Linux, so the agent drains (GOAWAY, in-flight requests finish) before
it exits. Logs go to ``[log] file`` (rotated) and to the Application event log.

The service runs as LocalService by default: a low-privilege account with network access that
can read the config directory when the installer grants it (``icacls``, printed by the
install command). A service account for Negotiate/Kerberos to a proxy can be set in the
service's Log On tab or with ``sc.exe config BackhaulAgent obj= DOMAIN\\svc-backhaul``.

Nothing here is imported on other systems: the pywin32 modules are looked up at call time.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path
from typing import Any

from agent.errors import AgentError

__all__ = ["DISPLAY_NAME", "SERVICE_NAME", "install", "uninstall"]

SERVICE_NAME = "BackhaulAgent"
DISPLAY_NAME = "Backhaul gateway agent"
DESCRIPTION = "Keeps the outbound tunnel to the Backhaul relay and calls allowed internal APIs."
DEFAULT_CONFIG_DIR = r"C:\ProgramData\Backhaul"


def _win32() -> tuple[Any, Any, Any, Any]:
    if sys.platform != "win32":
        raise AgentError("the Windows service exists only on Windows")
    try:
        return (
            importlib.import_module("win32serviceutil"),
            importlib.import_module("win32service"),
            importlib.import_module("win32event"),
            importlib.import_module("servicemanager"),
        )
    except ImportError:
        raise AgentError("pywin32 is missing: pip install 'backhaul[agent]'") from None


def _service_class() -> type:
    """The ServiceFramework subclass, built only where pywin32 exists."""
    serviceutil, service, event, manager = _win32()

    framework: Any = serviceutil.ServiceFramework

    class AgentService(framework):  # type: ignore[misc]
        _svc_name_ = SERVICE_NAME
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self._stopped = event.CreateEvent(None, 0, 0, None)
            self._loop: asyncio.AbstractEventLoop | None = None
            self._stop: asyncio.Event | None = None

        def SvcStop(self) -> None:
            self.ReportServiceStatus(service.SERVICE_STOP_PENDING)
            if self._loop is not None and self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
            event.SetEvent(self._stopped)

        def SvcDoRun(self) -> None:
            manager.LogMsg(
                manager.EVENTLOG_INFORMATION_TYPE, manager.PYS_SERVICE_STARTED, (SERVICE_NAME, "")
            )
            config_dir = serviceutil.GetServiceCustomOption(
                SERVICE_NAME, "config_dir", DEFAULT_CONFIG_DIR
            )
            _run_agent(Path(config_dir), self)

    return AgentService


def _run_agent(config_dir: Path, host: Any) -> None:
    """Load the configuration and run the agent until the service is stopped."""
    from agent.config import load_config
    from agent.service import run
    from backhaul.logging import configure

    cfg = load_config(config_dir)
    configure(
        "json",
        cfg.log.level,
        file=cfg.log.file or config_dir / "logs" / "agent.log",
        max_bytes=cfg.log.max_file_mb * 1024 * 1024,
        max_age_days=cfg.log.max_age_days,
    )
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    host._loop, host._stop = loop, stop
    try:
        loop.run_until_complete(run(cfg, stop=stop))
    finally:
        loop.close()


def install(config_dir: str = DEFAULT_CONFIG_DIR, account: str | None = None) -> list[str]:
    """Register and start the service; returns what the operator should know."""
    serviceutil, service, _event, _manager = _win32()
    serviceutil.InstallService(
        serviceutil.GetServiceClassString(_service_class()),
        SERVICE_NAME,
        DISPLAY_NAME,
        startType=service.SERVICE_AUTO_START,
        description=DESCRIPTION,
        delayedstart=True,
        userName=account or r"NT AUTHORITY\LocalService",
    )
    serviceutil.SetServiceCustomOption(SERVICE_NAME, "config_dir", config_dir)
    serviceutil.StartService(SERVICE_NAME)
    return [
        f"service {SERVICE_NAME} installed and started (config: {config_dir})",
        f'grant it the config directory: icacls "{config_dir}" /grant "LOCAL SERVICE:(OI)(CI)M"',
        f"recovery: sc.exe failure {SERVICE_NAME} reset= 300 actions= restart/10000",
    ]


def uninstall() -> list[str]:
    serviceutil, _service, _event, _manager = _win32()
    try:
        serviceutil.StopService(SERVICE_NAME)
    except Exception:  # noqa: S110 - already stopped
        pass
    serviceutil.RemoveService(SERVICE_NAME)
    return [f"service {SERVICE_NAME} removed; the config directory is kept"]


if sys.platform == "win32":  # pragma: no cover - the class pythonservice.exe loads
    try:
        AgentService = _service_class()
    except AgentError:
        pass


def main() -> None:  # pragma: no cover - pythonservice.exe entry point
    """``python -m agent.winservice`` (debug, start, stop) as pywin32's tooling expects."""
    serviceutil, _service, _event, _manager = _win32()
    serviceutil.HandleCommandLine(_service_class())


if __name__ == "__main__":  # pragma: no cover
    main()
