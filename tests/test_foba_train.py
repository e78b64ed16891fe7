"""train-foba: the fine-tuning stage (prompt mixing, rectangle loss, EMA checkpoint) and the segmentation
stage (network on the refined masks), each a tiny run whose output the foba labeler then loads."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from pseudolabel.jobs.training.foba import (
    TrainSpec,
    latent_grid_mask,
    segmentation_example,
    train_foba,
)
from pseudolabel.models.attention import load_sd_components
from pseudolabel.models.foba import FoBa
from pseudolabel.schemas.spec import LabelerSpec, SpecError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"resolution": 64, "attention_steps": 2, "attention_stride": 300, "inpaint_steps": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from foba_tiny import write_shapes

    return write_shapes(str(tmp_path_factory.mktemp("foba_data")))


def test_defaults_are_the_published_settings():
    spec = TrainSpec(weights="w", data="d", output="o")
    assert (spec.stage, spec.masks, spec.foreground_probability, spec.lr, spec.scale_lr, spec.batch_size,
            spec.ema_decay, spec.resolution) == ("finetune", "preliminary", 0.5, 1e-4, True, 3, 0.9999, 512)
    assert (spec.seg_resolution, spec.seg_steps, spec.seg_batch_size, spec.seg_lr, spec.seg_width) == \
        (128, 12000, 32, 2e-3, 64)
    with pytest.raises(SpecError, match="masks"):
        train_foba({"weights": "w", "data": "d", "output": "o", "masks": None})


def test_latent_grid_mask_is_the_cell_majority_on_the_canvas():
    m = np.zeros((16, 12), bool)          # image part (16, 12) of a 16 canvas, latent 2x2 cells of 8
    m[:8, :5] = True                      # 40 of 64 pixels of cell (0, 0)
    m[8:, :4] = True                      # 32 of 64 of cell (1, 0): exactly half counts
    assert latent_grid_mask(m, 16).tolist() == [[True, False], [True, False]]


def test_segmentation_example_resizes_image_and_mask_together():
    rng = np.random.default_rng(0)
    part = np.zeros((32, 64, 3), np.uint8)
    part[:, 32:] = 255
    mask = np.zeros((32, 64), bool)
    mask[:, 32:] = True                   # the mask follows the white half through resize/crop/flip
    x, y = segmentation_example(part, mask, 16, rng)
    assert x.shape == (3, 16, 16) and y.shape == (1, 16, 16)
    assert torch.allclose((x[0] + 1) / 2, y[0], atol=1e-5)


def test_finetune_saves_the_ema_unet_the_labeler_inpaints_with(tiny_sd, dataset, tmp_path):
    out = tmp_path / "ft"
    result = train_foba({"weights": tiny_sd, "data": f"{dataset}/images", "masks": f"{dataset}/masks",
                         "output": str(out), "resolution": 64, "steps": 3, "batch_size": 2, "category": "cat",
                         "log_every": 1})
    assert result["stage"] == "finetune" and result["images"] == 3 and result["steps"] == 3
    assert len(result["losses"]) == 3 and all(np.isfinite(result["losses"]))
    assert result["examples"] == 6 and 0 <= result["foreground_examples"] <= 6
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (out / name).exists(), name
    before = load_sd_components(tiny_sd).unet.state_dict()
    after = load_sd_components(str(out)).unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)   # trained
    lab = FoBa(LabelerSpec(name="foba", weights=tiny_sd, ontology=[{"category": "cat"}],
                           params={**FAST, "inpaint_weights": str(out)}))
    assert lab.weight_sources() == [tiny_sd, str(out)]
    image = cv2.imread(f"{dataset}/images/a/img1.png")[..., ::-1].copy()
    (res,) = lab([image])
    assert res.layers["foreground_mask"].shape == image.shape[:2]


def test_finetune_checkpoint_is_the_ema_of_the_steps(tiny_sd, dataset, tmp_path):
    """One step, same seed: with the default cap the decay is (1 + 1) / (10 + 1) = 2/11, so the checkpoint
    is base + 9/11 (raw - base); with a cap of 1e-12 the decay is ~0 and the checkpoint is the raw step."""
    base = load_sd_components(tiny_sd).unet.state_dict()
    common = {"weights": tiny_sd, "data": f"{dataset}/images", "masks": f"{dataset}/masks", "resolution": 64,
              "steps": 1, "batch_size": 2, "seed": 4}
    train_foba({**common, "output": str(tmp_path / "ema")})
    train_foba({**common, "output": str(tmp_path / "raw"), "ema_decay": 1e-12})
    ema = load_sd_components(str(tmp_path / "ema")).unet.state_dict()
    raw = load_sd_components(str(tmp_path / "raw")).unet.state_dict()
    changed = [k for k in base if not torch.equal(base[k], raw[k])]
    assert len(changed) > 10
    for k in changed:
        assert torch.allclose(ema[k], base[k] + 9 / 11 * (raw[k] - base[k]), atol=1e-6)


def test_finetune_with_preliminary_masks_to_s3(tiny_sd, dataset, s3_bucket, tmp_path, monkeypatch):
    from pseudolabel.storage import filesystem

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    bucket, storage = s3_bucket
    out = f"{bucket}/ckpt/foba"
    result = train_foba({"weights": tiny_sd, "data": f"{dataset}/images", "category": "cat",
                         "preliminary_params": {"attention_steps": 2, "attention_stride": 300},
                         "output": out, "storage": storage.model_dump(), "resolution": 64, "steps": 1,
                         "batch_size": 2, "limit": 2})
    assert result["images"] == 2 and np.isfinite(result["losses"][0])
    fs, root = filesystem(out, storage)
    assert fs.exists(root + "/unet/config.json") and fs.exists(root + "/tokenizer/vocab.json")


def test_segmentation_stage_on_refined_masks_then_the_labeler_uses_it(tiny_sd, dataset, tmp_path):
    from foba_tiny import build_tiny_foba

    pair = build_tiny_foba(str(tmp_path / "pair"))
    out = tmp_path / "seg"
    result = train_foba({"stage": "segmentation", "weights": pair["base"], "inpaint_weights": pair["inpaint"],
                         "data": f"{dataset}/images", "output": str(out), "category": "cat", "resolution": 64,
                         "labeler_params": {k: v for k, v in FAST.items() if k != "resolution"},
                         "seg_resolution": 32, "seg_steps": 2, "seg_batch_size": 2, "seg_width": 2})
    assert result["stage"] == "segmentation" and result["steps"] == 2 and all(np.isfinite(result["losses"]))
    assert 0.0 <= result["foreground_fraction"] <= 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {"kind": "foba-segmentation", "width": 2, "resolution": 32}
    lab = FoBa(LabelerSpec(name="foba", weights=pair["base"], ontology=[{"category": "cat"}],
                           params={"segmentation_weights": str(out)}))
    image = cv2.imread(f"{dataset}/images/b/img2.png")[..., ::-1].copy()
    (res,) = lab([image])
    assert set(res.layers) == {"foreground_mask"} and res.layers["foreground_mask"].shape == image.shape[:2]


def test_segmentation_stage_learns_from_a_mask_folder(dataset, tmp_path):
    """Given refined masks as PNGs, a few Adam steps of BCE fit the squares: loss falls, and the labeler
    with the trained network finds the square of a training image."""
    out = tmp_path / "seg"
    result = train_foba({"stage": "segmentation", "weights": "/unused", "data": f"{dataset}/images",
                         "refined_masks": f"{dataset}/masks", "output": str(out), "resolution": 64,
                         "seg_resolution": 32, "seg_steps": 60, "seg_batch_size": 3, "seg_width": 4,
                         "log_every": 100})
    losses = result["losses"]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    lab = FoBa(LabelerSpec(name="foba", weights="/unused", ontology=[{"category": "cat"}],
                           params={"segmentation_weights": str(out)}))
    for name in ("a/img0", "b/img2"):
        image = cv2.imread(f"{dataset}/images/{name}{'.jpg' if name == 'a/img0' else '.png'}")[..., ::-1].copy()
        truth = cv2.imread(f"{dataset}/masks/{name}.png", cv2.IMREAD_GRAYSCALE) > 0
        pred = lab([image])[0].layers["foreground_mask"] > 0
        assert (pred & truth).sum() / (pred | truth).sum() > 0.7
