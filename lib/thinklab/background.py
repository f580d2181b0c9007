"""A worker thread that runs jobs in order, so that the caller never waits on them.

The runner hands it the grading and writing of each finished chunk while the model keeps
decoding. Jobs run one at a time in submission order (a run's last part is written
before its run.json says it is complete). The first error a job raises is raised again
in the caller by the next `submit` or by `close`; jobs after a failed one are skipped.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable


class Background:
    def __init__(self, name: str = "thinklab-background"):
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is not None:
                continue
            try:
                job()
            except BaseException as exc:  # handed to the caller, which decides
                self._error = exc

    def submit(self, job: Callable[[], object]) -> None:
        self._raise()
        self._jobs.put(job)

    def close(self, raise_error: bool = True) -> None:
        """Wait for every submitted job; then raise the first error, if any (and asked to)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
