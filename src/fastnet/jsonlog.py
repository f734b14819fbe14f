"""``JSONFormatter``: one JSON object per log line (``fastnet serve --log-format json``).

Each line carries ``ts`` (ISO 8601, UTC, milliseconds: ``2026-12-01T09:30:00.123Z``),
``level``, ``logger`` and ``message`` (the formatted message), then every
field the record was given as ``extra`` (``peer``, ``listener``, ...), and
``exc`` (the formatted traceback) when it carries an exception. A value JSON
cannot hold is written as its ``str()``. Log collectors (Loki, Elasticsearch,
CloudWatch) take such lines without a parsing rule.

Use it in your own logging set-up::

    handler = logging.StreamHandler()
    handler.setFormatter(fastnet.jsonlog.JSONFormatter())
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

__all__ = ["JSONFormatter"]

# The attributes every LogRecord has (and the two that format() adds); any
# other attribute came from ``extra`` and is written as a field of its own.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
}

# The fields of the line itself: an ``extra`` of the same name is written
# with a leading underscore rather than overwriting one.
_OWN_FIELDS = ("ts", "level", "logger", "message", "exc", "stack")


class JSONFormatter(logging.Formatter):
    """Format each record as one line of JSON: ``ts``, ``level``, ``logger``, ``message``,
    the record's ``extra`` fields, and ``exc``/``stack`` when present."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one JSON object, with no newline in it."""
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES:
                line[f"_{key}" if key in _OWN_FIELDS else key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # json escapes the newlines of a traceback: one object per line.
        return json.dumps(line, default=str, ensure_ascii=False)
