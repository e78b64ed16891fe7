"""directsam: pyramid arithmetic, preprocessing, loading (local and s3://), tokens, embeddings."""
from __future__ import annotations

import math
import os

import numpy as np
import pydantic
import pytest
import torch
from directsam_tiny import (
    blocks_image,
    hub_cache_snapshot,
    noise_image,
    save_tiny_segformer,
    tiny_dinov2,
    tiny_segformer,
)

from pseudolabel.models.directsam_pyramid import (
    border_weights,
    normalize,
    preprocess,
    pyramid_probs,
    reference_pyramid_probs,
    resize_uint8,
)
from pseudolabel.models.directsam_views import crop_boxes
from pseudolabel.schemas.spec import LabelerSpec

P = 1 / (1 + math.exp(-0.7))  # sigmoid of the stub's constant logit


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def constant_forward(calls):
    """Stub network: logits 0.7 everywhere at 1/4 resolution; records the batch shapes it sees."""

    def forward(pixel_values):
        calls.append(tuple(pixel_values.shape))
        n, _, r, _ = pixel_values.shape
        return torch.full((n, 1, r // 4, r // 4), 0.7)

    return forward


# --- pyramid geometry ------------------------------------------------------------------------------

def test_crop_boxes_layer1_non_square():
    # W=300, H=200, 2 crops per side: crop_w = ceil((90 + 300) / 2) = 195, crop_h = ceil((90 + 200) / 2) = 145,
    # starts x: 0, 105; y: 0, 55; x-major order
    assert crop_boxes(300, 200, 1) == [(0, 0, 195, 145), (0, 55, 195, 200), (105, 0, 300, 145), (105, 55, 300, 200)]


def test_crop_boxes_layer2_non_square():
    # 4 per side: crop_w = ceil((270 + 300) / 4) = 143, starts 0, 53, 106, 159 (last clipped at 300);
    # crop_h = ceil((270 + 200) / 4) = 118, starts 0, 28, 56, 84 (last clipped at 200)
    boxes = crop_boxes(300, 200, 2)
    xs = [(0, 143), (53, 196), (106, 249), (159, 300)]
    ys = [(0, 118), (28, 146), (56, 174), (84, 200)]
    assert boxes == [(x0, y0, x1, y1) for x0, x1 in xs for y0, y1 in ys]


def test_border_weights_bands():
    w = border_weights(145, 195).numpy()
    assert w[0, 100] == 0 and w[29, 100] == 0 and w[100, 165] == 0      # 30 px zero band
    assert w[30, 100] == 0.5 and w[59, 100] == 0.5 and w[60, 100] == 1  # 60 px half band
    assert w[40, 40] == 0.25 and w[72, 97] == 1 and w[100, 150] == 0.25
    assert w[144, 194] == 0


def test_pyramid_layer1_constant_logits_hand_computed():
    calls = []
    img = np.zeros((200, 300, 3), np.uint8)
    prob = pyramid_probs([img], constant_forward(calls), resolution=32, layers=1, batch_size=3)[0].numpy()
    assert prob.shape == (200, 300)
    # 1 whole view + 4 crops, 3 per forward pass
    assert calls == [(3, 3, 32, 32), (2, 3, 32, 32)]
    # (whole + sum of weighted crops) / 2, crop boxes as in test_crop_boxes_layer1_non_square
    assert prob[10, 10] == pytest.approx(P / 2)                 # crop 0 only, local (10, 10): zero band
    assert prob[40, 40] == pytest.approx((P + 0.25 * P) / 2)    # crop 0, halved on both axes
    assert prob[100, 70] == pytest.approx(P)                    # crops 0 and 1, each halved once
    assert prob[40, 150] == pytest.approx((P + 0.5 * P) / 2)    # crops 0 and 2, each 0.25
    assert prob[20, 150] == pytest.approx(P / 2)                # rows < 30 of crops 0 and 2: zero
    assert prob[199, 299] == pytest.approx(P / 2)               # crop 3's corner: zero


def test_pyramid_layer2_constant_logits_hand_computed():
    calls = []
    imgs = [np.zeros((200, 300, 3), np.uint8), np.zeros((64, 96, 3), np.uint8)]
    probs = pyramid_probs(imgs, constant_forward(calls), resolution=32, layers=2, batch_size=64)
    # both images' 1 + 4 + 16 views in one forward pass
    assert calls == [(42, 3, 32, 32)]
    prob = probs[0].numpy()
    # (x=40, y=40): layer 1 crop 0 gives 0.25 P; layer 2: x in crop 0 (local 40: 0.5),
    # y in crop 0 (local 40: 0.5) and crop 1 (local 12: zero) -> 0.25 P; sum / 3
    assert prob[40, 40] == pytest.approx((P + 0.25 * P + 0.25 * P) / 3)
    # (x=299, y=100): the last column is in the zero band of every crop
    assert prob[100, 299] == pytest.approx(P / 3)
    # (x=150, y=100): layer 1 -> P; layer 2: x crops 1, 2 (0.5 each), y crops 1, 2 (0.5 each) -> P
    assert prob[100, 150] == pytest.approx(P)
    assert probs[1].shape == (64, 96)


def test_pyramid_matches_one_crop_at_a_time_reference():
    from transformers import SegformerImageProcessorPil

    model = tiny_segformer()
    proc = SegformerImageProcessorPil()
    images = [blocks_image(150, 230, seed=1), blocks_image(96, 80, seed=2)]
    with torch.inference_mode():
        ours = pyramid_probs(images, lambda x: model(pixel_values=x).logits, 64, layers=2, batch_size=7)
    for img, got in zip(images, ours):
        ref = reference_pyramid_probs(img, proc, model, 64, layers=2)
        assert got.shape == ref.shape
        assert float(ref.std()) > 1e-3  # the map is not flat, so the comparison means something
        # the same preprocessing value for value; only batched vs one-view float arithmetic differs
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)


# --- preprocessing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(77, 130), (200, 150), (40, 50)])
@pytest.mark.parametrize("uint8_kernel", [True, False])
def test_preprocess_matches_segformer_image_processor(shape, uint8_kernel):
    from transformers import SegformerImageProcessorPil

    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ref = SegformerImageProcessorPil(size={"height": 96, "width": 96})(img, return_tensors="pt").pixel_values
    t = torch.from_numpy(img).permute(2, 0, 1)[None]
    ours = normalize(resize_uint8(t, 96, uint8_kernel=uint8_kernel))
    assert ours.shape == ref.shape == (1, 3, 96, 96)
    one_level = 1 / 255 / 0.224 + 1e-4  # at most one grey level apart
    diff = (ours - ref).abs()
    assert float(diff.max()) <= one_level
    assert float((diff > 1e-4).float().mean()) < (0.02 if uint8_kernel else 0.3)
    if uint8_kernel:
        np.testing.assert_allclose(preprocess([img], 96).numpy(), ours.numpy())


# --- the checkpoint's image processor, value for value -----------------------------------------------

#: processor configs: the tiny checkpoint's own (bilinear, ImageNet) and non-default ones
PROCESSOR_CONFIGS = {
    "checkpoint": None,
    "bicubic-non-square": dict(size={"height": 96, "width": 72}, resample=3, image_mean=[0.5, 0.5, 0.5],
                               image_std=[0.5, 0.5, 0.5]),
    "lanczos-no-normalize": dict(size={"height": 64, "width": 64}, resample=1, do_normalize=False,
                                 rescale_factor=1 / 127.5),
    "box-no-rescale": dict(size={"height": 80, "width": 112}, resample=4, do_rescale=False,
                           image_mean=[120.0, 115.0, 100.0], image_std=[60.0, 58.0, 61.0]),
}


def checkpoint_with_processor(model_dir, path, config):
    """A copy of the tiny checkpoint whose preprocessor_config.json is ``config`` (None = unchanged)."""
    import shutil

    from transformers import SegformerImageProcessorPil

    shutil.copytree(model_dir, path)
    if config is not None:
        SegformerImageProcessorPil(**config).save_pretrained(path)
    return str(path)


def network_inputs(lab, images):
    """The pixel values the labeler's network receives for ``images`` (one boundary_maps call)."""
    real, seen = lab._network, []

    def spy(pixel_values):
        seen.append(pixel_values.clone())
        return real(pixel_values=pixel_values)

    lab._network = spy
    lab.boundary_maps(images)
    lab._network = real
    return torch.cat(seen)


@pytest.mark.parametrize("config", list(PROCESSOR_CONFIGS))
def test_network_input_equals_checkpoint_image_processor(model_dir, tmp_path, config):
    """What the network receives equals SegformerImageProcessorPil (the checkpoint's config) exactly,
    for upscaled, downscaled and non-square images and crops."""
    from transformers import SegformerImageProcessorPil

    from pseudolabel.models.directsam_views import image_views

    weights = checkpoint_with_processor(model_dir, tmp_path / "ckpt", PROCESSOR_CONFIGS[config])
    proc = SegformerImageProcessorPil.from_pretrained(weights)
    lab = make(weights)
    assert lab.preprocessing.size == (proc.size["height"], proc.size["width"])
    assert lab.preprocessing.resample == int(proc.resample)
    shapes = [(77, 130), (200, 150), (40, 50), (128, 128), (300, 129)]
    for k, (h, w) in enumerate(shapes):
        img = noise_image(h, w, seed=k) if k % 2 else blocks_image(h, w, seed=k)
        ref = proc(img, return_tensors="pt").pixel_values
        got = network_inputs(lab, [img])
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert torch.equal(got, ref), (config, (h, w), float((got - ref).abs().max()))
    # pyramid crops too: the views reach the network sorted by size (stable), one forward pass
    img = blocks_image(150, 230, seed=7)
    lab1 = make(weights, pyramid_layers=1)
    views = sorted(image_views(230, 150, 1, 90), key=lambda v: (v[0][3] - v[0][1], v[0][2] - v[0][0]))
    ref = torch.cat([proc(img[y0:y1, x0:x1], return_tensors="pt").pixel_values for (x0, y0, x1, y1), _ in views])
    assert torch.equal(network_inputs(lab1, [img]), ref)


def test_processor_config_settings_are_read(model_dir, tmp_path):
    from pseudolabel.models.directsam_views import Preprocessing, parse_resample

    cfg = PROCESSOR_CONFIGS["box-no-rescale"]
    lab = make(checkpoint_with_processor(model_dir, tmp_path / "ckpt", cfg))
    pre = lab.preprocessing
    assert (pre.size, pre.resample, pre.do_rescale, pre.do_normalize) == ((80, 112), 4, False, True)
    assert pre.mean == (120.0, 115.0, 100.0) and pre.std == (60.0, 58.0, 61.0)
    assert lab.resolution == 80
    # params.resolution replaces the size (a square), as the reference's resolution argument does
    assert make(str(tmp_path / "ckpt"), resolution=96).preprocessing.size == (96, 96)
    # no config: the Segformer processor's defaults
    assert Preprocessing.from_config({}, None, 512) == Preprocessing(size=(512, 512))
    assert parse_resample("BICUBIC") == parse_resample("Resampling.BICUBIC") == 3 and parse_resample(None) == 2
    with pytest.raises(ValueError, match="resample"):
        parse_resample(9)
    with pytest.raises(ValueError, match="do_resize"):
        Preprocessing.from_config({"do_resize": False})


def test_fast_resize_is_close_to_but_not_the_image_processor(model_dir, tmp_path):
    from transformers import SegformerImageProcessorPil

    img = noise_image(200, 150, seed=1)
    ref = SegformerImageProcessorPil.from_pretrained(model_dir)(img, return_tensors="pt").pixel_values
    fast = network_inputs(make(model_dir, fast_resize=True), [img])
    diff = (fast - ref).abs()
    assert float(diff.max()) <= 1 / 255 / 0.224 + 1e-4  # at most one grey level apart
    assert float((diff > 1e-4).float().mean()) > 0  # not the processor's values (on noise: many of them)
    lanczos = checkpoint_with_processor(model_dir, tmp_path / "ckpt", PROCESSOR_CONFIGS["lanczos-no-normalize"])
    with pytest.raises(ValueError, match="fast_resize"):
        make(lanczos, fast_resize=True)


# --- the labeler -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_segformer(str(tmp_path_factory.mktemp("directsam") / "tiny"), resolution=128)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))


def make(weights, storage=None, **params):
    from pseudolabel.models.registry import labeler_class

    cls = labeler_class("directsam")
    spec = LabelerSpec(name="directsam", weights=weights, params=params)
    return cls(spec, device="cpu", storage=storage)


def median_threshold(weights, images, **params):
    """The random network has no calibrated boundaries: threshold its maps at their median so the
    tokenisation is non-trivial (many regions) whatever the random weights."""
    probs = make(weights, **params).boundary_maps(images)
    return float(np.median(np.concatenate([p.numpy().ravel() for p in probs])))


def test_registry_and_params():
    from pseudolabel.models.directsam import DirectSAM
    from pseudolabel.models.registry import labeler_class

    assert labeler_class("directsam") is DirectSAM
    p = DirectSAM.Params()
    assert (p.threshold, p.pyramid_layers, p.overlap, p.embedding_weights) == (0.25, 0, 90, None)
    # the reference's rule (probs_to_masks) by default; the exact PIL preprocessing by default
    assert p.mode == "simple" and p.fast_resize is False
    assert "our addition" in DirectSAM.Params.model_fields["mode"].description
    assert "not exact" in DirectSAM.Params.model_fields["fast_resize"].description
    with pytest.raises(pydantic.ValidationError):
        DirectSAM.Params(mode="bogus")


def test_labeler_local_and_s3_give_identical_tokens(model_dir, s3_bucket):
    from pseudolabel.storage import filesystem

    bucket, storage = s3_bucket
    uri = f"{bucket}/models/tiny"
    fs, root = filesystem(uri, storage)
    for name in os.listdir(model_dir):
        fs.put_file(os.path.join(model_dir, name), f"{root}/{name}")

    images = [noise_image(80, 112, seed=0), noise_image(72, 64, seed=3)]
    thr = median_threshold(model_dir, images, pyramid_layers=1)
    local = make(model_dir, pyramid_layers=1, threshold=thr)(images)
    remote = make(uri, storage=storage, pyramid_layers=1, threshold=thr)(images)
    assert len(local) == len(remote) == 2
    for a, b, img in zip(local, remote, images):
        assert a.tokens.label_map.shape == img.shape[:2]
        assert a.tokens.label_map.max() >= 2  # a real tokenisation, not one region
        np.testing.assert_array_equal(a.tokens.label_map, b.tokens.label_map)
        np.testing.assert_array_equal(a.tokens.boundary_score, b.tokens.boundary_score)


def test_labeler_resolution_defaults_to_checkpoint_processor(model_dir):
    assert make(model_dir).resolution == 128
    assert make(model_dir, resolution=96).resolution == 96


def test_labeler_partition_covers_every_pixel_once(model_dir):
    images = [noise_image(80, 112), noise_image(64, 64, seed=5)]
    out = make(model_dir, mode="partition", max_tokens=None, threshold=median_threshold(model_dir, images))(images)
    for o, img in zip(out, images):
        lm = o.tokens.label_map
        k = int(lm.max())
        assert k >= 2 and lm.min() >= 1
        areas = np.bincount(lm.ravel(), minlength=k + 1)[1:]
        assert areas.sum() == img.shape[0] * img.shape[1] and (areas > 0).all()
        assert (np.diff(areas) <= 0).all()  # sorted by area, largest first


def test_labeler_simple_leaves_boundary_unassigned(model_dir):
    images = [noise_image(80, 112)]
    thr = median_threshold(model_dir, images)
    lab = make(model_dir, mode="simple", max_tokens=None, save_boundary=True, threshold=thr)
    out = lab(images)[0]
    prob = lab.boundary_maps(images)[0].numpy()
    lm = out.tokens.label_map
    assert lm.max() >= 2
    # tokens come from the map as the boundary layer stores it (uint16): within 1/65535 of the float map
    stored = out.layers["boundary"].astype(np.float32) / np.float32(65535)
    assert np.abs(stored - prob).max() <= 0.5 / 65535 + 1e-7
    np.testing.assert_array_equal(lm == 0, stored >= thr)
    assert 0.3 < (lm == 0).mean() < 0.7
    assert out.layers["boundary"].dtype == np.uint16 and out.layers["boundary"].shape == lm.shape
    assert ((out.tokens.boundary_score >= 0) & (out.tokens.boundary_score <= 1)).all()


def test_labeler_max_tokens(model_dir):
    images = [noise_image(80, 112)]
    thr = median_threshold(model_dir, images)
    full = make(model_dir, mode="simple", max_tokens=None, threshold=thr)(images)[0].tokens.label_map
    out = make(model_dir, mode="simple", max_tokens=2, threshold=thr)(images)[0].tokens.label_map
    assert full.max() > 2 and out.max() == 2
    np.testing.assert_array_equal(out == 1, full == 1)
    np.testing.assert_array_equal(out == 2, full == 2)


def test_labeler_bfloat16_on_cpu(model_dir):
    images = [noise_image(80, 112)]
    lab32 = make(model_dir)
    lab16 = LabelerSpec(name="directsam", weights=model_dir, dtype="bfloat16")
    from pseudolabel.models.directsam import DirectSAM

    lab16 = DirectSAM(lab16, device="cpu")
    assert lab32.model.dtype == torch.float32 and lab16.model.dtype == torch.bfloat16
    a, b = lab32.boundary_maps(images)[0], lab16.boundary_maps(images)[0]
    assert a.dtype == b.dtype == torch.float32
    assert float((a - b).abs().max()) < 0.05


# --- token embeddings ------------------------------------------------------------------------------

def test_mask_pool_matches_direct_average():
    from pseudolabel.models.directsam_host import mask_pool

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 4, 6)).astype(np.float32)
    lm = rng.integers(0, 4, size=(8, 12))
    got = mask_pool(feats, lm, 3)
    assert got.dtype == np.float32 and got.shape == (3, 5)
    # pixel (y, x) sits in cell (y * 4 // 8, x * 6 // 12) = (y // 2, x // 2)
    for k in range(1, 4):
        ys, xs = np.nonzero(lm == k)
        expected = feats[:, ys // 2, xs // 2].mean(axis=1)
        np.testing.assert_allclose(got[k - 1], expected, rtol=1e-5, atol=1e-6)


def test_labeler_token_embeddings_from_dinov2_backbone(model_dir, tmp_path):
    from scipy import ndimage

    tiny_dinov2(str(tmp_path / "dino"), hidden_size=16, image_size=56)
    images = [noise_image(80, 112), noise_image(64, 64, seed=5)]
    thr = median_threshold(model_dir, images)
    plain = make(model_dir, threshold=thr)(images)
    assert all(o.tokens.embeddings is None for o in plain)
    out = make(model_dir, threshold=thr, embedding_weights=str(tmp_path / "dino"), embedding_resolution=56)(images)
    for o, p in zip(out, plain):
        np.testing.assert_array_equal(o.tokens.label_map, p.tokens.label_map)
        lm = o.tokens.label_map
        k = int(lm.max())
        emb = o.tokens.embeddings
        # 16 pooled backbone channels, then the normalised box [x0/W, y0/H, x1/W, y1/H]
        assert emb.shape == (k, 16 + 4) and emb.dtype == np.float32 and np.isfinite(emb).all()
        assert np.abs(emb[0, :16] - emb[-1, :16]).max() > 0  # tokens at different places pool different features
        h, w = lm.shape
        for t, (sy, sx) in enumerate(ndimage.find_objects(lm)):
            expected = [sx.start / w, sy.start / h, sx.stop / w, sy.stop / h]
            np.testing.assert_allclose(emb[t, 16:], expected, rtol=1e-6)


# --- checkpoint preprocessing config from the hub, boundary layer precision --------------------------

def test_hub_id_resolution_from_checkpoint_preprocessor_at_revision(tmp_path, monkeypatch):
    """A hub id reads the checkpoint's preprocessor_config.json (at the spec's revision) like a local dir
    does: the offline hub cache holds a tiny checkpoint under the default id with an 1800 px processor."""
    import huggingface_hub
    from huggingface_hub import constants

    from pseudolabel.models.directsam import DirectSAM

    repo = DirectSAM.default_weights  # chendelong/DirectSAM-1800px-0424
    files = save_tiny_segformer(str(tmp_path / "files"), resolution=1800)
    hub_cache_snapshot(str(tmp_path / "hub"), repo, files, revision="v1")
    bare = str(tmp_path / "bare")  # the same checkpoint without its preprocessor_config.json
    save_tiny_segformer(bare)
    os.remove(os.path.join(bare, "preprocessor_config.json"))
    hub_cache_snapshot(str(tmp_path / "hub"), "someone/bare-directsam", bare, revision="main")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []
    real = huggingface_hub.hf_hub_download

    def spy(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("revision")))
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    lab = DirectSAM(LabelerSpec(name="directsam", revision="v1", dtype="float32"), device="cpu")
    assert lab.resolution == 1800
    assert calls == [(repo, "preprocessor_config.json", "v1")]
    # a hub checkpoint whose processor config cannot be had: an error unless the resolution is given
    with pytest.raises(ValueError, match="resolution"):
        make("someone/bare-directsam")
    assert make("someone/bare-directsam", resolution=96).resolution == 96
    # a host half (the engine's decode tasks) reads the same file the same way: the same processor
    for weights, params in ((repo, {}), ("someone/bare-directsam", {"resolution": 96})):
        spec = LabelerSpec(name="directsam", weights=weights, revision="v1" if weights == repo else None, params=params)
        assert DirectSAM.host_half(spec).preprocessing == DirectSAM(spec, device="cpu").preprocessing


def test_boundary_layer_is_uint16_and_keeps_low_threshold_tokens():
    """The saved ``boundary`` layer, stored as the engine stores it and read back as evaluate reads it,
    gives the tokens of the float map at threshold 0.03 (8 bits would move values by up to 1/510)."""
    import tempfile

    from pseudolabel.engine.encode import encode_output
    from pseudolabel.jobs.evaluation.evaluate import _boundary_layer
    from pseudolabel.jobs.evaluation.metrics import asa
    from pseudolabel.models.tokens import boundary_to_tokens

    with tempfile.TemporaryDirectory() as d:  # map centred near 0.03, like a calibrated model's
        weights = save_tiny_segformer(d, resolution=128, bias=math.log(0.03 / 0.97) + 0.3)
        lab = make(weights, mode="simple", threshold=0.03, max_tokens=None, save_boundary=True)
        images = [noise_image(80, 112), noise_image(64, 64, seed=5)]
        outs = lab(images)
        probs = [m.numpy() for m in lab.boundary_maps(images)]
    for out, prob in zip(outs, probs):
        assert out.layers["boundary"].dtype == np.uint16
        h, w = prob.shape
        row = {"layers": encode_output(out, "directsam", h, w)["layers"]}
        decoded, labeler = _boundary_layer(row)
        assert labeler == "directsam" and decoded.shape == prob.shape
        assert float(np.abs(decoded - prob).max()) <= 0.5 / 65535 + 1e-7
        near = np.abs(prob - 0.03) < 2e-3
        assert near.mean() > 0.05  # many pixels within 8-bit rounding of the threshold
        ref = boundary_to_tokens(prob, 0.03, "simple").label_map
        got = boundary_to_tokens(decoded, 0.03, "simple").label_map
        assert ((ref == 0) != (got == 0)).mean() < 0.005  # the same boundary pixels but a few
        assert abs(int(ref.max()) - int(got.max())) <= 1
        assert asa(got, ref) > 0.99 and asa(ref, got) > 0.99


# --- the two halves --------------------------------------------------------------------------------

def test_split_halves_compose_to_the_labeler_exactly(model_dir, tmp_path):
    """forward -> payload bytes -> a weight-free host half gives exactly what the labeler gives in-process."""
    from pseudolabel.engine.payload import pack_payload, unpack_payload
    from pseudolabel.models.directsam import DirectSAM

    tiny_dinov2(str(tmp_path / "dino"), hidden_size=16, image_size=56)
    images = [noise_image(80, 112), noise_image(64, 64, seed=5)]
    params = dict(threshold=median_threshold(model_dir, images), save_boundary=True,
                  embedding_weights=str(tmp_path / "dino"), embedding_resolution=56)
    lab = make(model_dir, **params)
    whole = lab(images)
    payloads = lab.forward(images, [None, None])
    assert [sorted(p) for p in payloads] == [["boundary", "features"]] * 2
    assert payloads[0]["boundary"].dtype == np.uint16 and payloads[0]["boundary"].shape == (80, 112)
    host = DirectSAM.host_half(LabelerSpec(name="directsam", weights=str(tmp_path / "missing"), params=params))
    assert not hasattr(host, "model")  # no weights were loaded
    for im, pl, ref in zip(images, payloads, whole):
        got = host.postprocess(im, None, unpack_payload(pack_payload(pl)))
        np.testing.assert_array_equal(got.tokens.label_map, ref.tokens.label_map)
        np.testing.assert_array_equal(got.tokens.boundary_score, ref.tokens.boundary_score)
        np.testing.assert_array_equal(got.tokens.embeddings, ref.tokens.embeddings)
        np.testing.assert_array_equal(got.layers["boundary"], ref.layers["boundary"])
        assert int(got.tokens.label_map.max()) >= 2


def test_prepare_resizes_every_view_on_a_host_half_without_the_weights(model_dir, s3_bucket, tmp_path):
    """``prepare`` (the engine's decode tasks) on a host half: the checkpoint's processor size read from
    its config alone (local or s3://, no weight copy); the views equal the in-process resize, and
    forward handed them gives the payload forward makes on its own."""
    import glob

    from pseudolabel.models.directsam import DirectSAM
    from pseudolabel.models.directsam_views import image_views
    from pseudolabel.storage import filesystem

    bucket, storage = s3_bucket
    uri = f"{bucket}/models/prep"
    fs, root = filesystem(uri, storage)
    for name in os.listdir(model_dir):
        fs.put_file(os.path.join(model_dir, name), f"{root}/{name}")
    image = noise_image(90, 130, seed=5)
    n_views = len(image_views(130, 90, 2))
    full = make(model_dir, pyramid_layers=2)
    for weights, st in ((model_dir, None), (uri, storage)):
        half = DirectSAM.host_half(LabelerSpec(name="directsam", weights=weights, params={"pyramid_layers": 2}), st)
        views = half.prepare(image, None)["views"]
        assert views.shape == (n_views, 128, 128, 3) and views.dtype == np.uint8
        np.testing.assert_array_equal(views, full.prepare(image, None)["views"])
    assert not glob.glob(str(tmp_path / "cache" / "weights" / "*" / "*.safetensors"))  # nothing copied

    images = [image, noise_image(40, 70, seed=6)]
    prepared = [full.prepare(im, None) for im in images]
    for a, b in zip(full.forward(images, [None, None], prepared=prepared), full.forward(images, [None, None])):
        np.testing.assert_array_equal(a["boundary"], b["boundary"])
    assert make(model_dir, fast_resize=True).prepare(image, None) is None  # the device resizes
