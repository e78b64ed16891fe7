"""The trainers' shared start: spec validated with overrides, torch threads and seeds set, clock started."""
from __future__ import annotations

import pytest
import torch

from pseudolabel.jobs.training.common import start
from pseudolabel.jobs.training.foba import TrainSpec as FobaSpec
from pseudolabel.jobs.training.incontext import TrainSpec as InContextSpec
from pseudolabel.schemas.spec import SpecError


def test_start_validates_seeds_and_sets_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        run = start(InContextSpec, {"output": str(tmp_path / "a")}, {"seed": 7, "threads": 1})
        assert run.spec.seed == 7 and torch.get_num_threads() == 1
        first = (torch.rand(3), run.rng.random(3))
        again = start(InContextSpec, {"output": str(tmp_path / "a"), "seed": 7})
        assert torch.equal(torch.rand(3), first[0]) and (again.rng.random(3) == first[1]).all()
        assert 0 <= run.seconds() < 60
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SpecError, match="steps"):
        start(FobaSpec, {"data": str(tmp_path), "output": str(tmp_path / "b"), "steps": 0})
