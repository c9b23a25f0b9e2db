"""Stop strings: generation ends where the text first contains one of them, and that text is never streamed.

OpenAI clients send `stop` (up to 4 strings). A stop string can span several tokens and a token can hold the end of
one stop string and the start of the next text, so the check is on the text, not on token ids. While a suffix of the
text produced so far could still grow into a stop string it is held back (as vLLM's detokenizer does), so a client
never sees part of a stop string: `push` returns only text that can no longer be part of one.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Cuts a stream of text deltas at the earliest occurrence of any of `stops` (non-empty strings)."""

    def __init__(self, stops: Sequence[str]) -> None:
        if not stops or any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self._longest = max(len(s) for s in self.stops)
        self._pending = ""  # text held back: it may be the start of a stop string

    def push(self, text: str) -> tuple[str, bool]:
        """The text that is safe to emit now, and whether a stop string was found (then nothing more follows)."""
        self._pending += text
        found = [i for s in self.stops if (i := self._pending.find(s)) >= 0]
        if found:
            cut, self._pending = self._pending[:min(found)], ""
            return cut, True
        keep = self._held_back()
        safe_end = len(self._pending) - keep
        safe, self._pending = self._pending[:safe_end], self._pending[safe_end:]
        return safe, False

    def flush(self) -> str:
        """The end of the stream: what was held back is plain text after all."""
        rest, self._pending = self._pending, ""
        return rest

    def _held_back(self) -> int:
        """The length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        text = self._pending
        for size in range(min(len(text), self._longest - 1), 0, -1):
            if any(s.startswith(text[-size:]) for s in self.stops):
                return size
        return 0
