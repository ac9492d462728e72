"""Soak: several worker processes on one queue under a mixed, failing workload for about a
minute (SOAK_SECONDS of producing, default 45, then the drain). See soak.py for the workload
and the checks; a failure prints every problem found, which worker wedged with its counters,
and which jobs were left in which state."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .soak import SoakConfig, run_soak

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "45"))
SOAK_SEED = int(os.environ.get("SOAK_SEED", "20261201"))


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 150)
async def test_soak_workers_neither_wedge_nor_lose_leases(
    redis_url: str, queue_name: str, tmp_path: Path
) -> None:
    cfg = SoakConfig(seconds=SOAK_SECONDS, seed=SOAK_SEED)
    result = await run_soak(redis_url, queue_name, cfg, tmp_path)
    print(json.dumps(result.summary, sort_keys=True))
    assert result.summary["jobs"] > cfg.rate * cfg.seconds * 0.8, "the producer fell behind"
    assert not result.problems, result.render()
