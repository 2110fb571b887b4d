"""Logging for `parafill`: stderr (stdout carries LSP) or a file, and no source text.

pygls logs every message it sends and the parameters of failed messages at
INFO/DEBUG, which would copy the user's code and the suggestions into the
log. Its loggers are held at WARNING unless `verboseLogging` is on; parafill's
own log lines carry sizes, timings and URIs, and text only when verbose.
"""
from __future__ import annotations

import json
import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error")
CHATTY = ("pygls", "pytest_lsp")
# What reading a frame whose body is not JSON raises.
UNPARSABLE = (json.JSONDecodeError, UnicodeDecodeError)


class UnparsableFrameFilter(logging.Filter):
    """Drops pygls's traceback for a frame that is not JSON: the server answers it with
    ParseError and logs one line itself (`ParafillServer.report_server_error`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage() == "Unable to handle message" and isinstance(exc, UNPARSABLE))


def configure_logging(level: str = "warning", log_file: str | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    handler = logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
    pygls_reader = logging.getLogger("pygls.server")
    if not any(isinstance(f, UnparsableFrameFilter) for f in pygls_reader.filters):
        pygls_reader.addFilter(UnparsableFrameFilter())
    set_verbose(False)


def set_verbose(verbose: bool) -> None:
    """Let pygls log message bodies (source text included) only when asked to."""
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
