"""Stop strings matched on decoded text, across token boundaries."""

from __future__ import annotations


class StopMatcher:
    """Feeds text deltas; holds back any tail that could still become a stop string.

    ``feed`` returns (text safe to emit, matched?). After a match the text before the stop
    string is returned and the stop string itself is dropped, as Ollama and OpenAI do.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self._stops:
            return delta, False
        text = self._pending + delta
        first = min(((i, s) for s in self._stops if (i := text.find(s)) >= 0), default=None)
        if first is not None:
            self._pending = ""
            return text[: first[0]], True
        hold = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text
