"""Progress of long steps, in the terminal and in the logs.

A person at a terminal sees a tqdm bar; the logs (which Prefect forwards to its UI and console, since the CLI sets
PREFECT_LOGGING_EXTRA_LOGGERS=llmpress) get a line at the first update, then at most every `every` seconds, and at
the end, each with the elapsed time and an estimate of what is left:

    evaluate: perplexity, KL, top-1 12/31 windows, 38.1 s elapsed, ~60 s left

`phase` logs the start and the end (with its seconds) of a step that has no natural count, such as an export.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from tqdm.auto import tqdm

log = logging.getLogger("llmpress.progress")


class Progress:
    """A callback `progress(done, total)` that drives a bar and rate-limited log lines."""

    def __init__(self, desc: str, unit: str, every: float = 10.0, logger: logging.Logger = log) -> None:
        self.desc, self.unit, self.every, self.log = desc, unit, every, logger
        self.start = time.perf_counter()
        self.last_log: float | None = None
        self.done, self.total = 0, 0
        self.bar = tqdm(desc=desc, unit=unit, leave=False)

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        now = time.perf_counter()
        if self.last_log is None or now - self.last_log >= self.every or done >= total:
            self.last_log = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        text = f"{self.desc} {self.done}/{self.total} {self.unit}s, {elapsed:.1f} s elapsed"
        if 0 < self.done < self.total:
            text += f", ~{elapsed / self.done * (self.total - self.done):.0f} s left"
        return text

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@contextlib.contextmanager
def phase(what: str, logger: logging.Logger = log) -> Iterator[None]:
    """Log `what` when it starts and when it ends, with its seconds."""
    logger.info("%s ...", what)
    start = time.perf_counter()
    yield
    logger.info("%s done in %.1f s", what, time.perf_counter() - start)
