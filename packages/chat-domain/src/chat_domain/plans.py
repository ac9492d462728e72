"""Plan price -> queue priority and fairness weight. Pure: no database access."""

from __future__ import annotations

from dataclasses import dataclass

PREMIUM_PRICE_CENTS = 10_000  # $100.00 / month and above
STANDARD_PRICE_CENTS = 5_000  # $50.00 - $99.99 / month


@dataclass(frozen=True, slots=True)
class QueuePriority:
    """What a job enqueued for a tenant gets: ``priority`` (lower runs first) and the tenant's
    queue-group fairness ``weight`` (higher gets a bigger share)."""

    priority: int
    weight: int


def priority_for_price(monthly_price_cents: int) -> QueuePriority:
    """>= $100/month -> priority 1, weight 4; $50-$99.99 -> 3, 2; below $50 (free too) -> 5, 1."""
    if monthly_price_cents < 0:
        raise ValueError("a plan price cannot be negative")
    if monthly_price_cents >= PREMIUM_PRICE_CENTS:
        return QueuePriority(priority=1, weight=4)
    if monthly_price_cents >= STANDARD_PRICE_CENTS:
        return QueuePriority(priority=3, weight=2)
    return QueuePriority(priority=5, weight=1)
