"""Exceptions of queue-core.

`QueueError` is the base of everything the library raises about its own state or input. The
"control" exceptions (`UnrecoverableError`, `RateLimitError`, `GroupRateLimitError`,
`DelayJob`) are raised by processors to steer what happens to the running job.
"""

from __future__ import annotations

from queue_core.limits import MAX_DELAY_MS, checked_delay

__all__ = [
    "DelayJob",
    "GroupFullError",
    "GroupRateLimitError",
    "InvalidOptionError",
    "JobFailedError",
    "JobNotFoundError",
    "JobTimeoutError",
    "LeaseLostError",
    "PayloadTooLargeError",
    "QueueError",
    "RateLimitError",
    "SerializationError",
    "UnrecoverableError",
    "WorkerStateError",
]


class QueueError(Exception):
    """Base class of queue-core's own errors."""


class InvalidOptionError(QueueError, ValueError):
    """An option or argument has an invalid value; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class SerializationError(QueueError, TypeError):
    """A payload or return value cannot be encoded as JSON."""


class PayloadTooLargeError(QueueError, ValueError):
    """The encoded payload is larger than the queue's limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload is {size} bytes, the limit is {limit} bytes")
        self.size = size
        self.limit = limit


class GroupFullError(QueueError):
    """The job's group already holds its maximum number of waiting jobs."""

    def __init__(self, group: str, max_size: int) -> None:
        super().__init__(f"group {group!r} is full ({max_size} waiting jobs)")
        self.group = group
        self.max_size = max_size


class JobNotFoundError(QueueError, LookupError):
    """No job with this id exists (it may have been removed by retention)."""


class JobFailedError(QueueError):
    """`wait_until_finished` saw the job fail; `reason` is its last error."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason


class JobTimeoutError(QueueError, TimeoutError):
    """A job ran longer than its `timeout`."""


class LeaseLostError(QueueError):
    """The worker no longer holds the job's lease (it stalled and another worker took it)."""


class WorkerStateError(QueueError, RuntimeError):
    """A worker was used in the wrong lifecycle state (e.g. started twice)."""


def _control_delay(value: object) -> int:
    delay = checked_delay(value)
    if delay is None:
        raise InvalidOptionError(
            "delay_ms", f"must be a number of milliseconds between 0 and {MAX_DELAY_MS}"
        )
    return delay


class UnrecoverableError(Exception):
    """Raised by a processor: fail the job now, whatever attempts remain."""


class RateLimitError(Exception):
    """Raised by a processor: the whole queue is rate limited for `delay_ms`.

    The job returns to the front of the queue without using an attempt.
    """

    def __init__(self, delay_ms: int, message: str = "rate limited") -> None:
        super().__init__(message)
        self.delay_ms = _control_delay(delay_ms)


class GroupRateLimitError(Exception):
    """Raised by a processor: the job's group is rate limited for `delay_ms`.

    The job goes back to the head of its group and the group pauses; other groups keep flowing.
    No attempt is used.
    """

    def __init__(self, delay_ms: int, message: str = "group rate limited") -> None:
        super().__init__(message)
        self.delay_ms = _control_delay(delay_ms)


class DelayJob(Exception):
    """Raised by a processor: run this job again after `delay_ms`, without using an attempt."""

    def __init__(self, delay_ms: int) -> None:
        self.delay_ms = _control_delay(delay_ms)
        super().__init__(f"delayed by {self.delay_ms} ms")
