"""train-foba: background-restricted diffusion loss, a few fine-tuning steps, checkpoint the labeler loads."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch


from pseudolabel.jobs.train_foba import latent_weight, masked_diffusion_loss, train_foba
from pseudolabel.models.attention import encode_image, encode_text, load_sd_components
from pseudolabel.models.foba import FoBa
from pseudolabel.schemas.spec import LabelerSpec


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three 64 px images in nested folders plus foreground-mask PNGs with the same relative names."""
    root = tmp_path_factory.mktemp("foba_data")
    rng = np.random.default_rng(0)
    for i, rel in enumerate(["a/img0.jpg", "a/img1.png", "b/img2.png"]):
        img = np.full((64, 64, 3), 30 + 40 * i, np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        y, x = rng.integers(8, 32, 2)
        img[y:y + 24, x:x + 24] = (200, 60, 60)
        mask[y:y + 24, x:x + 24] = 255
        for sub, arr, name in (("images", img[..., ::-1], rel), ("masks", mask, os.path.splitext(rel)[0] + ".png")):
            path = root / sub / name
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.ascontiguousarray(arr))
    return root


def test_latent_weight_is_one_minus_area_averaged_foreground():
    fg = np.zeros((1, 16, 16), bool)
    fg[0, :8, :] = True
    fg[0, 8:10, 0:2] = True
    w = latent_weight(fg, (2, 2))
    assert w.shape == (1, 1, 2, 2)
    assert torch.allclose(w[0, 0], torch.tensor([[0.0, 0.0], [1.0 - 4 / 64, 1.0]]))


def test_masked_loss_counts_only_background_pixels(tiny_sd):
    sd = load_sd_components(tiny_sd)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 600])
    emb = encode_text(sd.tokenizer, sd.text_encoder, "a photo of a background")[0]
    weight = torch.ones(2, 1, 8, 8)
    weight[..., :, :4] = 0.0                   # left half is foreground
    with torch.no_grad():
        loss = masked_diffusion_loss(sd.unet, sd.scheduler, z0, emb, weight, noise, t)
        full = masked_diffusion_loss(sd.unet, sd.scheduler, z0, emb, None, noise, t)
        pred = sd.unet(sd.scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=emb.expand(2, -1, -1)).sample
    err = (pred - noise) ** 2
    assert torch.allclose(loss, err[..., 4:].mean(), rtol=1e-5)
    assert torch.allclose(full, err.mean(), rtol=1e-5)
    assert not torch.allclose(loss, full)


def test_loss_decreases_on_a_fixed_batch(tiny_sd):
    sd = load_sd_components(tiny_sd)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        z0 = encode_image(sd.vae, images)
        emb = encode_text(sd.tokenizer, sd.text_encoder, "a photo of a background")[0]
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.tensor([200, 700])
    weight = torch.ones(2, 1, 8, 8)
    weight[0, :, 2:6, 2:6] = 0.0
    unet = sd.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = masked_diffusion_loss(unet, sd.scheduler, z0, emb, weight, noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0]


def test_train_foba_saves_a_checkpoint_the_labeler_loads(tiny_sd, dataset, tmp_path):
    out = tmp_path / "ckpt"
    result = train_foba({"weights": tiny_sd, "data": str(dataset / "images"), "masks": str(dataset / "masks"),
                         "output": str(out), "resolution": 64, "steps": 3, "batch_size": 2, "lr": 1e-3,
                         "foreground_prompt": "a photo of a {}", "category": "cat", "log_every": 1})
    assert result["images"] == 3 and result["steps"] == 3
    assert len(result["losses"]) == 3 and all(np.isfinite(result["losses"]))
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (out / name).exists(), name
    before = load_sd_components(tiny_sd).unet.state_dict()
    after = load_sd_components(str(out)).unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)   # the UNet was trained
    lab = FoBa(LabelerSpec(name="foba", weights=str(out), ontology=[{"category": "cat"}],
                           params={"resolution": 64, "attention_steps": 2, "attention_stride": 300,
                                   "inpaint_steps": 2}))
    image = cv2.imread(str(dataset / "images" / "a" / "img1.png"))[..., ::-1].copy()
    (res,) = lab([image])
    assert res.layers["foreground_mask"].shape == (64, 64)
    assert res.layers["background"].shape == (64, 64, 3)


def test_train_foba_with_preliminary_masks_to_s3(tiny_sd, dataset, s3_bucket, tmp_path, monkeypatch):
    from pseudolabel.storage import filesystem

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    bucket, storage = s3_bucket
    out = f"{bucket}/ckpt/foba"
    result = train_foba({"weights": tiny_sd, "data": str(dataset / "images"), "masks": "preliminary",
                         "category": "cat", "preliminary_params": {"attention_steps": 2, "attention_stride": 300},
                         "output": out, "storage": storage.model_dump(), "resolution": 64, "steps": 1,
                         "batch_size": 2, "limit": 2})
    assert result["images"] == 2 and np.isfinite(result["losses"][0])
    fs, root = filesystem(out, storage)
    assert fs.exists(root + "/unet/config.json") and fs.exists(root + "/tokenizer/vocab.json")
    lab = FoBa(LabelerSpec(name="foba", weights=out, ontology=[{"category": "cat"}],
                           params={"resolution": 64, "attention_steps": 2, "attention_stride": 300, "refine": False}),
               storage=storage)
    (res,) = lab([np.zeros((64, 64, 3), np.uint8)])
    assert res.layers["foreground_mask"].shape == (64, 64)
