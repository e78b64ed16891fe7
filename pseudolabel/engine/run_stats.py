"""Seconds per labeler and phase, summed over the actors and tasks of one run (``summary.json``).

A named Ray actor (``RunStats``) the stages report to with fire-and-forget calls; the driver reads it
at the end. This module imports nothing heavy, so the actor starts in an idle worker in a moment.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class RunStats:
    """Seconds and images per (labeler index, phase) summed over every actor and task of one run; a
    named Ray actor (``stats_actor``) the stages report to, read by the driver for ``summary.json``."""

    def __init__(self) -> None:
        self.totals: dict[tuple[int, str], list[float]] = {}

    def add(self, index: int, phase: str, seconds: float, images: int) -> None:
        total = self.totals.setdefault((index, phase), [0.0, 0])
        total[0] += seconds
        total[1] += images

    def get(self) -> dict[tuple[int, str], list[float]]:
        return self.totals


def stats_actor(name: str):
    """Start the run's RunStats actor under ``name`` (no CPU reserved), on the driver's node: worker
    nodes may be lost mid-run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(RunStats).options(name=name, num_cpus=0, scheduling_strategy=here).remote()


def stats_totals(actor, timeout: float = 30) -> dict:
    """The actor's totals, or {} when it cannot answer (timings never fail a run), then stop it."""
    import ray

    try:
        return ray.get(actor.get.remote(), timeout=timeout)
    except Exception as err:
        log.warning("per-labeler timings unavailable (%s)", type(err).__name__)
        return {}
    finally:
        try:
            ray.kill(actor)
        except Exception:
            pass


_STATS_HANDLES: dict[str, Any] = {}


def report_seconds(stats: str | None, index: int, phase: str, seconds: float, images: int) -> None:
    """Record a timing in the run's RunStats actor; nothing when there is none (in-process use)."""
    if not stats or not images:
        return
    try:
        import ray

        if stats not in _STATS_HANDLES:
            _STATS_HANDLES[stats] = ray.get_actor(stats)
        # waited for (a few ms): a batch's timing is recorded before its rows can be committed, so the
        # run's totals, read once the write is done, never miss the last batches
        ray.get(_STATS_HANDLES[stats].add.remote(index, phase, seconds, images), timeout=10)
    except Exception:  # timings are informative: never fail a batch for them
        pass
