"""The SeFM network, its checkpoints, training, and the ``incontext`` labeler's sefm backend."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from pseudolabel.models.incontext import canvas as cv
from pseudolabel.models.incontext.component import decode_query
from pseudolabel.models.incontext.sefm import SeFM, SeFMConfig
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.spec import LabelerSpec

TINY = dict(width=8, enc_blocks=[1, 1], dec_blocks=[1], refine_blocks=0, heads=[1, 2], ffn_expansion=2.0, cell=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_png(path, rgb):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(path)


def _demo_pair(tmp_path, size=48, seed=0):
    from pseudolabel.jobs.demo_data import add_watermark, render_scene

    rng = np.random.default_rng(seed)
    clean = render_scene(rng, size, shadow_prob=0.0, watermark_prob=0.0).clean
    marked, _ = add_watermark(clean, rng, text="DEMO")
    return _write_png(tmp_path / "demo_in.png", marked), _write_png(tmp_path / "demo_out.png", clean)


@pytest.mark.parametrize("layout", ["grid", "vertical"])
def test_untrained_sefm_is_identity_on_the_answer_cell(layout):
    cfg = SeFMConfig(**{**TINY, "layout": layout, "in_channels": 3 if layout == "grid" else 6})
    torch.manual_seed(0)
    net = SeFM(cfg).eval()
    rng = np.random.default_rng(0)
    a, b, q = (rng.uniform(size=(32, 32, 3)).astype(np.float32) for _ in range(3))
    x = torch.from_numpy(cv.stitch(a, b, q, 32, layout)).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = net(x)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(cv.crop_answer(out, layout), q, atol=1e-6)
    # the body is not trivially zero: only the zero-initialised last projection makes it the identity
    with torch.no_grad():
        torch.nn.init.normal_(net.out.weight, std=0.1)
        changed = net(x)[0].permute(1, 2, 0).numpy()
    assert np.abs(cv.crop_answer(changed, layout) - q).mean() > 1e-3


@pytest.mark.parametrize("hw", [(30, 50), (33, 17), (64, 64)])
def test_forward_shapes_for_any_size(hw):
    net = SeFM(SeFMConfig(**{**TINY, "enc_blocks": [1, 1, 1], "dec_blocks": [1, 1], "heads": [1, 2, 4]})).eval()
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, *hw)
    torch.testing.assert_close(y, x)


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    net = SeFM(SeFMConfig(**TINY))
    with torch.no_grad():
        torch.nn.init.normal_(net.out.weight, std=0.05)
    net.save_pretrained(str(tmp_path / "ck"))
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    loaded = SeFM.from_pretrained(str(tmp_path / "ck"))
    assert loaded.config == net.config
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x))
    with pytest.raises(FileNotFoundError, match="no public weights"):
        SeFM.from_pretrained(str(tmp_path / "missing"))


def test_config_validation():
    with pytest.raises(ValueError):
        SeFMConfig(**{**TINY, "dec_blocks": [1, 1]})
    with pytest.raises(ValueError):
        SeFMConfig(**{**TINY, "heads": [3, 2]})


def test_labeler_requires_weights_and_untrained_is_identity(tmp_path):
    demo_in, demo_out = _demo_pair(tmp_path)
    cls = labeler_class("incontext")
    with pytest.raises(ValueError, match="no public weights"):
        cls(LabelerSpec(name="incontext", params={"backend": "sefm", "demo_in": demo_in, "demo_out": demo_out}))
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)]
    lab = cls(LabelerSpec(name="incontext", params={"backend": "sefm", "demo_in": demo_in, "demo_out": demo_out,
                                                    "allow_untrained": True, "cell": 32}))
    outs = lab(images)
    for im, out in zip(images, outs):
        np.testing.assert_array_equal(out.layers["clean"], im)
        np.testing.assert_array_equal(out.layers["component"], np.full_like(im, 128))
        assert out.instances == []


def test_training_lowers_loss_and_checkpoint_loads_as_labeler(tmp_path, s3_bucket):
    from pseudolabel.jobs.train_incontext import train_incontext

    bucket, storage = s3_bucket
    # 1. a few steps on a fixed set of synthesised pairs lower the answer-cell L1
    summary = train_incontext({
        "output": f"{bucket}/sefm-tiny", "storage": storage.model_dump(), "model": TINY, "image_size": 32,
        "pool_size": 8, "examples": 4, "batch_size": 4, "steps": 40, "lr": 1e-2, "warmup_steps": 3,
        "log_every": 5, "seed": 0, "threads": 1,
    })
    losses = summary["losses"]
    assert len(losses) == 40
    # losses[0] is the untrained network's, i.e. the identity's: training ends well below it
    assert np.mean(losses[-5:]) < 0.8 * losses[0], losses
    # 2. the checkpoint (on S3) loads as the incontext labeler and changes the query
    demo_in, demo_out = _demo_pair(tmp_path, size=32)
    lab = labeler_class("incontext")(
        LabelerSpec(name="incontext", weights=f"{bucket}/sefm-tiny",
                    params={"backend": "sefm", "demo_in": demo_in, "demo_out": demo_out}),
        storage=storage)
    assert lab.net.config.cell == 32 and not lab.net.training
    from pseudolabel.jobs.demo_data import add_watermark, render_scene

    rng = np.random.default_rng(7)
    clean = render_scene(rng, 40, shadow_prob=0.0, watermark_prob=0.0).clean
    query, _ = add_watermark(clean, rng)
    out = lab([query])[0]
    assert out.layers["clean"].shape == query.shape and out.layers["clean"].dtype == np.uint8
    assert not np.array_equal(out.layers["clean"], query)
    np.testing.assert_array_equal(decode_query(out.layers["clean"], out.layers["component"]), query)
