"""``train-incontext``: the command line, fine-tuning from a checkpoint, time budgets, shadow and the
vertical layout; every checkpoint is loaded back as the ``incontext`` labeler (backend sefm)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from test_incontext_sefm import REF_TINY, TINY, _demo_pair, _watermarked_queries

from pseudolabel.models.incontext.component import decode_query
from pseudolabel.models.incontext.sefm import SeFM
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.spec import LabelerSpec, SpecError

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
    from pseudolabel.jobs.training.incontext import train_incontext

    summary = train_incontext({**QUICK, "output": str(tmp_path / "ck"), "model": TINY, "steps": 5,
                               "time_budget_s": 1e-9})
    assert summary["steps"] == 1 and len(summary["losses"]) == 1
    assert math.isfinite(summary["first_loss"]) and summary["first_loss"] == summary["last_loss"] > 0
    SeFM.from_pretrained(str(tmp_path / "ck"))


def test_init_from_trains_the_checkpoint_and_rejects_a_different_model(tmp_path):
    from pseudolabel.jobs.training.incontext import TrainSpec, train_incontext

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
    from pseudolabel.jobs.training.incontext import train_incontext

    out = str(tmp_path / "shadow")
    summary = train_incontext({**QUICK, "output": out, "model": TINY, "components": ["shadow"]})
    assert summary["steps"] == 2 and all(math.isfinite(v) and v > 0 for v in summary["losses"])
    _label_with(out, tmp_path)


def test_train_vertical_layout_two_steps(tmp_path):
    from pseudolabel.jobs.training.incontext import train_incontext

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


# ------------------------------------------------------------------------------------------------
# SeFM's training: defaults, multi-semantic data, the published architecture with L1 + adversarial BCE
# ------------------------------------------------------------------------------------------------

def test_defaults_are_sefms_training():
    from pseudolabel.jobs.training.incontext import TrainSpec, lr_schedule

    spec = TrainSpec(output="unused", steps=100)
    assert (spec.model.arch, spec.model.width, spec.model.cell, spec.model.layout) == ("sefm", 32, 256, "grid")
    assert (spec.batch_size, spec.lr, spec.min_lr, spec.warmup_steps, spec.adversarial_weight,
            spec.component_weight, spec.grad_clip, spec.scene_components) == (8, 2e-4, 1e-6, 0, 0.3, 0.0, None, 2)
    lr_at = lr_schedule(spec)
    assert lr_at(0) == pytest.approx(2e-4) and lr_at(50) == pytest.approx(1e-6 + (2e-4 - 1e-6) / 2)
    assert lr_at(99) == pytest.approx(1e-6, abs=1e-7) and all(lr_at(i) >= lr_at(i + 1) for i in range(99))


def test_scenes_keep_the_component_the_demonstration_does_not_remove():
    from pseudolabel.jobs.training.incontext_data import KINDS, LayeredScene, synthesize_example, type_index

    rng = np.random.default_rng(0)
    for kinds in [("shadow", "watermark"), ("watermark", "star"), ("logo", "circle", "shadow")]:
        for removed in kinds:
            kept = [k for k in kinds if k != removed]
            ex = synthesize_example(rng, kinds, removed, 48)
            a, b = ex.scenes
            # the demonstration removes one kind; the target removes the same kind from the query scene
            np.testing.assert_array_equal(ex.demo_in, a.compose(kinds))
            np.testing.assert_array_equal(ex.demo_out, a.compose(kept))
            np.testing.assert_array_equal(ex.query, b.compose(kinds))
            np.testing.assert_array_equal(ex.target, b.compose(kept))
            # ... and keeps the others: each kept kind is visible in the target and the demo output
            for k in kept:
                without = [j for j in kept if j != k]
                assert (ex.target != b.compose(without)).any(), (kinds, removed, k)
                assert (ex.demo_out != a.compose(without)).any(), (kinds, removed, k)
            # the mask is exactly where the query and the target differ; nothing else changes
            assert ex.mask.any() and (ex.demo_in != ex.demo_out).any()
            np.testing.assert_array_equal(ex.query[~ex.mask], ex.target[~ex.mask])
            assert ex.types.shape == (20,) and ex.types.sum() == 1 and ex.types[type_index(removed)] == 1
    # the same query scene, two demonstrations: the demonstration decides what goes
    scene = LayeredScene(np.random.default_rng(1), 48, ("shadow", "watermark"))
    assert not np.array_equal(scene.compose(["watermark"]), scene.compose(["shadow"]))
    assert len(KINDS) == 8 and KINDS[:3] == ("shadow", "watermark", "logo")


def test_make_batch_draws_two_kinds_per_scene():
    from pseudolabel.jobs.training.incontext_data import draw_kinds, make_batch

    rng = np.random.default_rng(0)
    for _ in range(20):
        kinds, removed = draw_kinds(rng, ["shadow", "watermark"], 2)
        assert len(set(kinds)) == 2 and removed in ("shadow", "watermark") and removed in kinds
    assert draw_kinds(rng, ["shadow"], 1) == (("shadow",), "shadow")
    x, y, m, types = make_batch(rng, ["watermark", "star"], 3, 32, "grid", 32)
    assert x.shape == (3, 3, 64, 64) and y.shape == (3, 3, 32, 32) and m.shape == (3, 1, 32, 32)
    assert types.shape == (3, 20) and (types.sum(dim=1) == 1).all()
    # the answer cell of the input canvas is the query; the target differs from it on the component
    assert ((x[:, :, 32:, 32:] - y).abs().amax(dim=(1, 2, 3)) > 0.05).all()


def test_sefm_training_steps_lower_the_loss(tmp_path):
    """The published architecture (tiny width), L1 + 0.3 · BCE of the discriminator, multi-semantic data."""
    from pseudolabel.jobs.training.incontext import train_incontext
    from pseudolabel.models.incontext.sefm import SeFMNet

    out = str(tmp_path / "ref")
    steps = 16
    summary = train_incontext({**QUICK, "output": out, "model": REF_TINY, "examples": 2, "batch_size": 2,
                               "pool_size": 2, "steps": steps, "lr": 2e-3, "components": ["watermark", "shadow"],
                               "log_every": 4})
    assert summary["arch"] == "sefm" and summary["steps"] == steps
    l1, adv, disc, total = (summary[k] for k in ("l1_losses", "adv_losses", "disc_losses", "losses"))
    assert len(l1) == len(adv) == len(disc) == len(total) == steps
    np.testing.assert_allclose(total, np.array(l1) + 0.3 * np.array(adv), rtol=1e-5)
    assert np.mean(l1[-4:]) < 0.7 * l1[0], l1
    assert np.mean(total[-4:]) < 0.8 * total[0], total
    assert all(math.isfinite(v) and v > 0 for v in disc)
    net = SeFM.from_pretrained(out)
    assert isinstance(net, SeFMNet) and net.config.width == REF_TINY["width"]
    _label_with(out, tmp_path)
