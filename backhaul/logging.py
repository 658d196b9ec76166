"""Structured logging with secret redaction, shared by the agent, the relay and the CLIs.

Why one module: every process logs through structlog, and the standard library loggers of the
libraries underneath (uvicorn, httpx, websockets) are routed through the same processor chain, so
one redaction step sees every line before it is rendered. The output is JSON lines when the
stream is not a terminal (a service under systemd, a container) and a readable console format
when a person is watching.

Redaction is defence in depth, not a licence to log secrets: values under sensitive key names
are replaced wholesale, and strings anywhere in the event (messages, URLs, tracebacks) have
Backhaul tokens, ``Authorization`` values (RFC 9110 §11.6.2) and secret query parameters masked.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from backhaul.errors import ConfigError

__all__ = ["REDACTED", "RotatingFile", "configure", "redact", "redact_text"]

REDACTED = "[redacted]"

#: Key names whose values are never logged (matched as case-insensitive substrings).
SENSITIVE_KEY_PARTS = (
    "password",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "cookie",
    "credential",
    "sealed",
    "private",
    "recovery",
)

#: API tokens (bh_), enrollment tokens (bhe_) and recovery keys (bhrk_).
_TOKEN_RE = re.compile(r"\b(bh(?:e|rk)?_)[A-Za-z0-9_\-.]+")
_AUTH_HEADER_RE = re.compile(
    r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=,]\s*[\"']?"
    r"(?:basic|bearer|negotiate|ntlm|digest|token)\s+)[^\s,;\"']+"
)
_AUTH_SCHEME_RE = re.compile(r"\b((?:Basic|Bearer|Negotiate|NTLM)\s+)[A-Za-z0-9+/=._~\-]{16,}")
_QUERY_SECRET_RE = re.compile(
    r"(?i)((?:^|[?&;\s\"'])[\w.\-]*(?:password|passwd|pwd|secret|token|api_?key|apikey|"
    r"signature|sig)[\w.\-]*=)[^&#\s\"']+"
)

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

#: Library loggers that get their own handlers by default; they are made to propagate to ours.
_FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "websockets")
#: Quiet unless something breaks: httpcore logs every socket operation at debug level, and
#: httpx logs every request URL with its query string, which may carry an API key.
_NOISY_LOGGERS = ("httpx", "httpcore", "hpack", "h2", "asyncio")

_HANDLER_MARK = "_backhaul_handler"


def _sensitive_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    return any(part in lowered for part in SENSITIVE_KEY_PARTS)


def redact_text(text: str) -> str:
    """Mask tokens, Authorization values and secret query parameters inside free text."""
    text = _TOKEN_RE.sub(lambda m: m.group(1) + REDACTED, text)
    text = _AUTH_HEADER_RE.sub(lambda m: m.group(1) + REDACTED, text)
    text = _AUTH_SCHEME_RE.sub(lambda m: m.group(1) + REDACTED, text)
    return _QUERY_SECRET_RE.sub(lambda m: m.group(1) + REDACTED, text)


def _redact_value(value: Any, depth: int = 0) -> Any:
    if depth > 20:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if _sensitive_key(k) else _redact_value(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        # A header pair such as ("Authorization", "Basic ...") is a key/value in disguise.
        if len(items) == 2 and _sensitive_key(items[0]):
            return [items[0], REDACTED]
        return [_redact_value(v, depth + 1) for v in items]
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Anything else (exceptions, URLs, pydantic models) is logged through its text form.
    return redact_text(str(value))


def redact(event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Return ``event_dict`` with every secret replaced by ``"[redacted]"``, recursively."""
    for key in list(event_dict):
        if _sensitive_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(event_dict[key])
    return event_dict


def _redact_processor(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    redacted = redact(event_dict)
    assert isinstance(redacted, dict)
    return redacted


def _use_json(fmt: str, stream: TextIO) -> bool:
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    if fmt != "auto":
        raise ConfigError(f"log.format: must be auto, json or console, not {fmt!r}")
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())


class RotatingFile(logging.handlers.BaseRotatingHandler):
    """A log file rotated by size and by day, whose rotated files are deleted by age.

    The live file is ``agent.log``; when the next line would take it past ``max_bytes``, or it
    was started on an earlier UTC day, it is renamed ``agent.log.<UTC time>`` and a new one is
    started. Rotated files older than ``max_age_days`` are then removed. Only the process that
    owns the file writes it (one agent per config dir), so no lock between processes is needed.
    """

    def __init__(self, path: Path, max_bytes: int, max_age_days: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(str(path), "a", encoding="utf-8", delay=False)
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_days * 86400
        self._day = self._started_day()
        self.prune()

    def _started_day(self) -> str:
        try:
            started = os.stat(self.path).st_mtime if self.path.stat().st_size else time.time()
        except OSError:
            started = time.time()
        return time.strftime("%Y-%m-%d", time.gmtime(started))

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        if self.stream is None:
            self.stream = self._open()
        size = self.stream.tell()
        if size == 0:
            return False
        if time.strftime("%Y-%m-%d", time.gmtime()) != self._day:
            return True
        return size + len(self.format(record)) + 1 > self.max_bytes

    def doRollover(self) -> None:
        if self.stream:
            self.stream.close()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        serial = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.{stamp}-{serial}")
            serial += 1
        if self.path.exists():
            os.replace(self.path, target)
        self.stream = self._open()
        self._day = time.strftime("%Y-%m-%d", time.gmtime())
        self.prune()

    def rotated(self) -> list[Path]:
        """The rotated files, oldest first."""
        prefix = self.path.name + "."
        found = [
            p for p in self.path.parent.glob(prefix + "*") if p.name[len(prefix) :][:1].isdigit()
        ]
        return sorted(found)

    def prune(self) -> None:
        cutoff = time.time() - self.max_age_seconds
        for old in self.rotated():
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:
                continue


def configure(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO = sys.stderr,
    *,
    file: Path | None = None,
    max_bytes: int = 100 * 1024 * 1024,
    max_age_days: int = 30,
) -> None:
    """Set up structlog and the standard library logging to write one redacted stream.

    ``fmt`` is ``auto`` (JSON unless ``stream`` is a terminal), ``json`` or ``console``;
    ``level`` is a standard level name. With ``file``, the same lines also go there as JSON,
    rotated by size (``max_bytes``, 100 MB by default) and day, and kept ``max_age_days`` (30).
    Calling it again replaces the previous setup.
    """
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise ConfigError(f"log.level: must be one of {', '.join(_LEVELS)}, not {level!r}")
    as_json = _use_json(fmt, stream)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            # Tracebacks become text before redaction so secrets in them are masked too.
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    handlers: list[logging.Handler] = [handler]
    if file is not None:
        to_file = RotatingFile(file, max_bytes, max_age_days)
        to_file.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=shared,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info,
                    _redact_processor,
                    structlog.processors.JSONRenderer(),
                ],
            )
        )
        setattr(to_file, _HANDLER_MARK, True)
        handlers.append(to_file)

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    for new_handler in handlers:
        root.addHandler(new_handler)
    root.setLevel(numeric)

    for name in _FOREIGN_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(logging.NOTSET)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
