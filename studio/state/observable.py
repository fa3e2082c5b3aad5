"""A minimal observer: Qt-free state objects tell widgets what changed."""

from __future__ import annotations

from collections.abc import Callable

Listener = Callable[[str], None]


class Observable:
    """Subscribers are called with a topic string (e.g. 'status', 'metrics') after each change."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        self._listeners.append(fn)

        def unsubscribe() -> None:
            if fn in self._listeners:
                self._listeners.remove(fn)

        return unsubscribe

    def notify(self, topic: str) -> None:
        for fn in list(self._listeners):
            fn(topic)
