"""Terminal progress for long jobs: shards done, tokens/s, ETA."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    """Prints one line per committed shard (or rewrites one line on a TTY)."""

    def __init__(self, total_shards: int, echo: Callable[[str], None] | None = None) -> None:
        self.total = total_shards
        self.done = 0
        self.tokens = 0
        self.started = time.perf_counter()
        self._echo = echo
        self._tty = echo is None and sys.stderr.isatty()

    def shard_done(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.tokens / elapsed
        remaining = (self.total - self.done) * elapsed / max(self.done, 1)
        line = (
            f"shards {self.done}/{self.total} | {self.tokens} tokens | "
            f"{rate:,.0f} tok/s | elapsed {elapsed:,.1f}s | ETA {remaining:,.1f}s"
        )
        self._emit(line, final=self.done == self.total)

    def _emit(self, line: str, *, final: bool) -> None:
        if self._echo is not None:
            self._echo(line)
        elif self._tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr, flush=True)
