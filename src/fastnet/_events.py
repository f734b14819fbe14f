"""Events of a client-side object: counted, passed to a hook, exported to Prometheus.

``Client`` and ``Pool`` report their state changes (a breaker opening, an
endpoint ejected, the pool exhausted...) the same three ways: a count per
event name (``stats()``), a call of the user's ``on_event(name, **info)``
(an exception there is logged, never raised into the caller), and, with
``metrics=registry``, a ``fastnet_<what>_events_total{event}`` counter read
at scrape time (every known event exported from the first scrape, at 0).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["Events"]

logger = logging.getLogger("fastnet")


class Events:
    """Counts and hook of one object's events (``what``: "client", "pool")."""

    __slots__ = ("_hook", "counts", "what")

    def __init__(self, what: str, names: Iterable[str], hook: Callable[..., Any] | None) -> None:
        if hook is not None and not callable(hook):
            raise TypeError(f"on_event must be callable, not {type(hook).__name__}")
        self.what = what
        self.counts = dict.fromkeys(names, 0)
        self._hook = hook

    def emit(self, name: str, **info: Any) -> None:
        """Count ``name`` and tell the hook."""
        self.counts[name] = self.counts.get(name, 0) + 1
        hook = self._hook
        if hook is None:
            return
        try:
            hook(name, **info)
        except Exception:
            logger.exception("%s: the on_event hook raised on %r", self.what, name)

    def register(self, registry: Any, extra: Callable[[], Iterator[Any]] | None = None) -> None:
        """Export the counts (and ``extra()``'s metric families) to a prometheus_client registry."""
        registry.register(_Collector(self, extra))


class _Collector:
    def __init__(self, events: Events, extra: Callable[[], Iterator[Any]] | None) -> None:
        self._events = events
        self._extra = extra

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        what = self._events.what
        family = CounterMetricFamily(
            f"fastnet_{what}_events", f"The {what}'s events, by name.", labels=["event"]
        )
        for name, count in sorted(self._events.counts.items()):
            family.add_metric([name], count)
        yield family
        if self._extra is not None:
            yield from self._extra()
