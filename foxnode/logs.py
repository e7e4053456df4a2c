"""Logging for foxnode's own modules, through ``twisted.logger``.

Every foxnode logger sends its events through one level filter, so
``--debug`` can turn foxnode's debug lines on without touching the observer
that twistd installed.

For log collectors, ``twistd --logger foxnode.logs.json_observer ...`` makes
twistd write one JSON object per line to standard output instead of text.
"""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
    jsonFileLogObserver,
)

_level = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_level])


def logger(namespace: str) -> Logger:
    """A Logger for a foxnode module: ``log = logs.logger(__name__)``."""
    return Logger(namespace=namespace, observer=_observer)


def set_debug(enabled: bool) -> None:
    _level.setLogLevelForNamespace("", LogLevel.debug if enabled else LogLevel.info)


def json_observer() -> ILogObserver:
    """A log observer factory for ``twistd --logger``: newline-delimited
    JSON on standard output (journald and most collectors read it as is)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
