"""queue-core: a reliable Redis job queue.

Atomic state changes in Lua, leases with token-checked finishing, retries with backoff,
priorities, delays, groups (per-conversation order and fair sharing), rate limits, dead letters,
stalled-job recovery, events and admin operations. See docs/queue-core.md.
"""

from queue_core.connection import connect
from queue_core.errors import (
    DelayJob,
    GroupFullError,
    GroupRateLimitError,
    InvalidOptionError,
    JobFailedError,
    JobNotFoundError,
    JobTimeoutError,
    LeaseLostError,
    PayloadTooLargeError,
    QueueError,
    RateLimitError,
    SerializationError,
    UnrecoverableError,
    WorkerStateError,
)
from queue_core.events import QueueEvent, QueueEvents
from queue_core.flows import FlowJob, FlowNode, FlowProducer
from queue_core.job import PENDING_STATES, TERMINAL_STATES, Job, JobState
from queue_core.metrics import QueueMetrics, QueueSnapshot, render_prometheus
from queue_core.options import MAX_PRIORITY, Backoff, Dedup, JobOptions, KeepJobs, QueueSettings
from queue_core.queue import BulkJob, Queue
from queue_core.registry import list_queues
from queue_core.schedulers import Schedule, SchedulerInfo
from queue_core.types import GroupInfo, JobCounts
from queue_core.worker import Worker

__all__ = [
    "MAX_PRIORITY",
    "PENDING_STATES",
    "TERMINAL_STATES",
    "Backoff",
    "BulkJob",
    "Dedup",
    "DelayJob",
    "FlowJob",
    "FlowNode",
    "FlowProducer",
    "GroupFullError",
    "GroupInfo",
    "GroupRateLimitError",
    "InvalidOptionError",
    "Job",
    "JobCounts",
    "JobFailedError",
    "JobNotFoundError",
    "JobOptions",
    "JobState",
    "JobTimeoutError",
    "KeepJobs",
    "LeaseLostError",
    "PayloadTooLargeError",
    "Queue",
    "QueueError",
    "QueueEvent",
    "QueueEvents",
    "QueueMetrics",
    "QueueSettings",
    "QueueSnapshot",
    "RateLimitError",
    "Schedule",
    "SchedulerInfo",
    "SerializationError",
    "UnrecoverableError",
    "Worker",
    "WorkerStateError",
    "connect",
    "list_queues",
    "render_prometheus",
]
