"""How long a batch waits for more work: only as long as more is known to be coming.

`@serve.batch` waits its `batch_wait_timeout_s` after every first request, for a batch
that, at low traffic, never fills: a fixed wait added to every lone request (8-10 ms
of the router's overhead, measured). This sets the wait before each request joins the
queue, from what is known: the other images of a multi-image request are on their
way (wait); requests are arriving faster than the wait (wait about two gaps, enough
to catch the next); otherwise nothing is coming and the request goes at once.
"""

from __future__ import annotations

import statistics
from collections import deque

from workers.jobs import ImageJob

GAPS = 8  # recent inter-arrival gaps that say how fast requests are arriving
SIBLING_TTL = 1.0  # s: a request's other images arrive within this of each other, or never


class BatchWait:
    """The wait for the batch a job is about to start, from the arrivals seen so far."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._last: float | None = None
        self._gaps: deque[float] = deque(maxlen=GAPS)
        self._siblings: dict[
            str, tuple[int, float]
        ] = {}  # request -> (images still to come, since)

    def arrived(self, job: ImageJob, now: float) -> float:
        """Note `job`'s arrival and return how long its batch should wait for more."""
        if self._last is not None:
            self._gaps.append(now - self._last)
        self._last = now
        self._note_siblings(job, now)
        if self.limit <= 0:
            return 0.0
        if self._siblings:
            return self.limit  # another image of a request already here is on its way
        if len(self._gaps) < 2 or self._gaps[-1] > self.limit:
            return 0.0  # a lone request after a quiet spell: nothing else is coming
        typical = statistics.median(self._gaps)
        return min(self.limit, 2 * typical) if typical < self.limit else 0.0

    def _note_siblings(self, job: ImageJob, now: float) -> None:
        for request_id, (_, since) in list(self._siblings.items()):
            if now - since > SIBLING_TTL:
                del self._siblings[request_id]  # a sibling refused upstream never comes
        if job.images <= 1:
            return
        left, since = self._siblings.get(job.request_id, (job.images, now))
        if left - 1 > 0:
            self._siblings[job.request_id] = (left - 1, since)
        else:
            self._siblings.pop(job.request_id, None)
