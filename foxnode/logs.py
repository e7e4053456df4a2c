"""Logging for foxnode's own modules, through ``twisted.logger``.

Every foxnode logger sends its events through one level filter, so
``--debug`` can turn foxnode's debug lines on without touching the observer
that twistd installed. ``--log-format json`` swaps the text observer for
one JSON object per line, for log collectors.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)

_level = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_level])


def logger(namespace: str) -> Logger:
    """A Logger for a foxnode module: ``log = logs.logger(__name__)``."""
    return Logger(namespace=namespace, observer=_observer)


def set_debug(enabled: bool) -> None:
    _level.setLogLevelForNamespace("", LogLevel.debug if enabled else LogLevel.info)
