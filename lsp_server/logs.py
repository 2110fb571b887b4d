"""Logging for `parafill`: stderr (stdout carries LSP) or a file, and no source text.

pygls logs every message it sends and the parameters of failed messages at
INFO/DEBUG, which would copy the user's code and the suggestions into the
log. Its loggers are held at WARNING unless `verboseLogging` is on; parafill's
own log lines carry sizes, timings and URIs, and text only when verbose.
"""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error")
CHATTY = ("pygls", "pytest_lsp")


def configure_logging(level: str = "warning", log_file: str | None = None) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    handler = logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))
    set_verbose(False)


def set_verbose(verbose: bool) -> None:
    """Let pygls log message bodies (source text included) only when asked to."""
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
