"""train-directsam: contour labels, a few steps on demo data lower the loss, the result loads as a labeler."""
from __future__ import annotations

import numpy as np
import pytest

from pseudolabel.jobs.train_directsam import boundary_label, masks_to_segments, train_directsam
from pseudolabel.schemas.spec import LabelerSpec


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_boundary_label_draws_3px_contours_of_every_segment():
    masks = np.zeros((2, 40, 50), bool)
    masks[0, 10:30, 10:30] = True   # a square
    masks[1, 13:22, 13:22] = True   # a smaller square on top of it
    seg = masks_to_segments(masks)
    assert seg[17, 17] == 2 and seg[12, 12] == 1 and seg[0, 0] == 0
    lab = boundary_label(seg, 3)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1}
    # the big square's outline (x = 10 column) drawn by cv2 with thickness 3: a band centred on x = 10
    assert lab[25, 8:13].all() and not lab[25, 7] and not lab[25, 13]
    # the small square's outline, the interior of both squares untouched
    assert lab[17, 13] and lab[17, 21]
    assert not lab[17, 17] and not lab[25, 20]
    # the background segment touches the image edge: the frame is boundary too (as in the reference)
    assert lab[0, 25] and lab[20, 0] and not lab[3, 25]
    # thickness 1
    assert boundary_label(seg, 1)[25, 10] and not boundary_label(seg, 1)[25, 9]


def test_train_few_steps_lowers_loss_and_loads_as_labeler(tmp_path, monkeypatch):
    from pseudolabel.jobs.demo_data import generate
    from pseudolabel.models.directsam import DirectSAM

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    demo = str(tmp_path / "demo")
    generate(demo, images=4, shards=1, size=64, progress=False)
    out = str(tmp_path / "ft")
    result = train_directsam({"data": demo, "model_size": "tiny", "output": out, "resolution": 64,
                              "steps": 30, "lr": 3e-3, "batch_size": 4, "log_every": 100})
    losses = result["losses"]
    assert result["images"] == 4 and len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])

    lab = DirectSAM(LabelerSpec(name="directsam", weights=out), device="cpu")
    assert lab.resolution == 64
    img = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    tok = lab([img])[0].tokens
    assert tok.label_map.shape == (64, 80) and tok.label_map.max() >= 1

    # training continues from the saved weights (same architecture, num_labels=1)
    again = train_directsam({"data": demo, "weights": out, "output": str(tmp_path / "ft2"), "resolution": 64,
                             "steps": 2, "lr": 1e-4, "batch_size": 2, "log_every": 100})
    assert abs(again["losses"][0] - np.mean(losses[-5:])) < 0.5 * np.mean(losses[:5])
