"""What every trainer does first: validate its spec, set torch's CPU threads, seed, start the clock.

Each trainer's spec model has ``seed`` and ``threads`` fields; ``start`` returns the validated spec, a
NumPy generator seeded from it (data order, crops, synthetic examples) and the start time, so the
three trainers begin the same way and report ``seconds`` the same way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from pydantic import BaseModel

from pseudolabel.schemas.spec import validate_spec

SpecT = TypeVar("SpecT", bound=BaseModel)


@dataclass
class TrainingStart(Generic[SpecT]):
    """A trainer's validated spec, its seeded NumPy generator and its start time (``time.time()``)."""

    spec: SpecT
    rng: np.random.Generator
    started: float = field(default_factory=time.time)

    def seconds(self) -> float:
        """Seconds since the trainer started."""
        return time.time() - self.started


def start(model: type[SpecT], spec: Any, overrides: dict[str, Any] | None = None) -> TrainingStart[SpecT]:
    """Validate ``spec`` (a model instance, dict or YAML path, with dotted ``overrides``) as ``model``;
    then ``torch.set_num_threads(spec.threads)`` when set and ``torch.manual_seed(spec.seed)``.

    Raises SpecError naming each bad field, before anything is loaded.
    """
    valid = validate_spec(model, spec, overrides)
    threads = getattr(valid, "threads", None)
    if threads:
        torch.set_num_threads(threads)
    seed = int(getattr(valid, "seed", 0))
    torch.manual_seed(seed)
    return TrainingStart(spec=valid, rng=np.random.default_rng(seed))
