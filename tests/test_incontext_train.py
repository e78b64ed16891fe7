"""``train-incontext``: the command line, fine-tuning from a checkpoint, time budgets, shadow and the
vertical layout; every checkpoint is loaded back as the ``incontext`` labeler (backend sefm)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from pseudolabel.models.incontext.component import decode_query
from pseudolabel.models.incontext.sefm import SeFM
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.spec import LabelerSpec, SpecError
from test_incontext_sefm import TINY, _demo_pair, _watermarked_queries

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: a few-second CPU run
QUICK = {"image_size": 32, "pool_size": 4, "batch_size": 2, "steps": 2, "warmup_steps": 1, "log_every": 50,
         "seed": 0, "threads": 1}


def _label_with(checkpoint: str, tmp_path) -> None:
    """The checkpoint loads as the incontext labeler and labels watermarked queries losslessly."""
    demo_in, demo_out = _demo_pair(tmp_path, size=32)
    lab = labeler_class("incontext")(LabelerSpec(
        name="incontext", weights=checkpoint, params={"backend": "sefm", "demo_in": demo_in, "demo_out": demo_out}))
    assert not lab.net.training
    queries = _watermarked_queries()
    for q, out in zip(queries, lab(queries)):
        clean, comp = out.layers["clean"], out.layers["component"]
        assert clean.shape == q.shape and clean.dtype == np.uint8
        np.testing.assert_array_equal(decode_query(clean, comp), q)


def test_cli_train_incontext_writes_a_checkpoint_that_loads_as_a_labeler(tmp_path, capsys):
    from pseudolabel.cli import main

    out = tmp_path / "sefm"
    job = tmp_path / "train.yaml"
    job.write_text(yaml.safe_dump({**QUICK, "output": str(out), "model": TINY, "steps": 300}))
    assert main(["train-incontext", str(job), "--set", "steps=2"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["steps"] == 2 and summary["output"] == str(out)  # --set overrode the YAML's 300
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    net = SeFM.from_pretrained(str(out))
    assert net.config.cell == TINY["cell"] and net.config.width == TINY["width"]
    _label_with(str(out), tmp_path)


def test_time_budget_still_runs_one_step(tmp_path):
    from pseudolabel.jobs.train_incontext import train_incontext

    summary = train_incontext({**QUICK, "output": str(tmp_path / "ck"), "model": TINY, "steps": 5,
                               "time_budget_s": 1e-9})
    assert summary["steps"] == 1 and len(summary["losses"]) == 1
    assert math.isfinite(summary["first_loss"]) and summary["first_loss"] == summary["last_loss"] > 0
    SeFM.from_pretrained(str(tmp_path / "ck"))


def test_init_from_trains_the_checkpoint_and_rejects_a_different_model(tmp_path):
    from pseudolabel.jobs.train_incontext import TrainSpec, train_incontext

    base = str(tmp_path / "base")
    train_incontext({**QUICK, "output": base, "model": TINY})
    base_config = SeFM.from_pretrained(base).config
    # 1. a model that disagrees with the checkpoint: an error naming both fields, before any training
    for spec, overrides in [({"model": {**TINY, "width": 16}}, {}),
                            ({}, {"model.width": 16}),
                            ({"model": {"width": 16}}, {})]:
        with pytest.raises(SpecError, match=r"init_from.*model\.width is 16 .* has 8"):
            train_incontext({**QUICK, "output": str(tmp_path / "bad"), "init_from": base, **spec}, **overrides)
    assert not (tmp_path / "bad").exists()
    # 2. model left out (dict or TrainSpec instance), or agreeing with it: the checkpoint's network
    for i, extra in enumerate([{}, {"model": TINY}, {"model": {"width": 8, "cell": 32}}]):
        out = str(tmp_path / f"tuned{i}")
        train_incontext({**QUICK, "output": out, "init_from": base, **extra})
        assert SeFM.from_pretrained(out).config == base_config
    out = str(tmp_path / "tuned-instance")
    train_incontext(TrainSpec(**QUICK, output=out, init_from=base))
    assert SeFM.from_pretrained(out).config == base_config
    # 3. the fine-tune starts from the checkpoint's weights: its first loss is the checkpoint's
    #    (same seed -> same first batch), not that of a fresh network
    again = train_incontext({**QUICK, "output": str(tmp_path / "again"), "init_from": base, "steps": 1})
    fresh = train_incontext({**QUICK, "output": str(tmp_path / "fresh"), "model": TINY, "steps": 1})
    assert again["first_loss"] != fresh["first_loss"]


def test_train_on_shadows_two_steps(tmp_path):
    from pseudolabel.jobs.train_incontext import train_incontext

    out = str(tmp_path / "shadow")
    summary = train_incontext({**QUICK, "output": out, "model": TINY, "components": ["shadow"]})
    assert summary["steps"] == 2 and all(math.isfinite(v) and v > 0 for v in summary["losses"])
    _label_with(out, tmp_path)


def test_train_vertical_layout_two_steps(tmp_path):
    from pseudolabel.jobs.train_incontext import train_incontext

    out = str(tmp_path / "vertical")
    summary = train_incontext({**QUICK, "output": out, "model": {**TINY, "layout": "vertical"},
                               "components": ["watermark", "shadow"]})
    assert summary["steps"] == 2 and all(math.isfinite(v) and v > 0 for v in summary["losses"])
    net = SeFM.from_pretrained(out)
    assert net.config.layout == "vertical" and net.config.in_channels == 6  # derived from the layout
    _label_with(out, tmp_path)
    with pytest.raises(SpecError, match="in_channels"):
        train_incontext({**QUICK, "output": str(tmp_path / "bad"), "model": {**TINY, "layout": "vertical",
                                                                             "in_channels": 3}})
