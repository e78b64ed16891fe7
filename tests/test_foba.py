"""foba labeler on a tiny random Stable Diffusion: token arithmetic, attention averaging, blended
inpainting, loading from a directory and from s3://, masks and layers at image size."""
from __future__ import annotations

import numpy as np
import pytest
import torch


from halves import assert_same_output
from pseudolabel.models.attention import CapturedAttention, encode_image, load_sd_components
from pseudolabel.models.foba import (
    FoBa,
    attention_timesteps,
    blended_inpaint,
    class_attention_map,
    class_token_indices,
)
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.spec import LabelerSpec

FAST = {"resolution": 64, "attention_steps": 4, "attention_stride": 200, "inpaint_steps": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def labeler(tiny_sd):
    spec = LabelerSpec(name="foba", weights=tiny_sd, params=FAST,
                       ontology=[{"category": "cat"}, {"category": "zebra"}])
    return labeler_class("foba")(spec)


def _images(seed=0):
    rng = np.random.default_rng(seed)
    a = np.full((72, 96, 3), 40, np.uint8)
    a[20:50, 30:70] = (220, 180, 60)
    a = np.clip(a + rng.integers(0, 30, a.shape), 0, 255).astype(np.uint8)
    b = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return [a, b]


# -- pure pieces ----------------------------------------------------------------------------------

def test_attention_timesteps_match_the_paper_schedule():
    ts = attention_timesteps(781, 40, 20)
    assert len(ts) == 40 and ts[0] == 781 and ts[-1] == 1
    assert all(a - b == 20 for a, b in zip(ts, ts[1:]))
    assert attention_timesteps(30, 5, 20) == [30, 10]


def test_class_token_indices_single_and_multi_token(tiny_sd):
    sd = load_sd_components(tiny_sd)
    tok = sd.tokenizer
    idx = class_token_indices(tok, "a photo of a cat", "cat")
    assert idx == [5]                      # BOS a photo of a cat
    ids = tok("a photo of a zebra").input_ids
    idx = class_token_indices(tok, "a photo of a zebra", "zebra")
    assert len(idx) == len(tok("zebra", add_special_tokens=False).input_ids) > 1
    assert idx[0] == 5 and idx == list(range(5, 5 + len(idx)))
    assert tok.decode([ids[i] for i in idx]).replace(" ", "") == "zebra"
    assert ids[idx[-1] + 1] == tok.eos_token_id
    with pytest.raises(ValueError):
        class_token_indices(tok, "a photo of a dog", "zebra")


def test_class_attention_map_upsamples_and_averages():
    b, tlen = 2, 7
    fine = torch.zeros(b, 8 * 8, tlen)
    fine[:, :, 3] = 1.0                    # uniform 1 at token 3
    coarse = torch.zeros(b, 2, 4 * 4, tlen)  # per-head layout (B, heads, Lq, T)
    coarse[:, 0, 0, 3] = 4.0                # top-left cell, head 0 only
    coarse[:, :, 5, 4] = 2.0                # cell (1, 1) at token 4, both heads
    recs = [CapturedAttention("a", "cross", (8, 8), 1, fine), CapturedAttention("b", "cross", (4, 4), 2, coarse)]
    m = class_attention_map(recs, [3], (8, 8))
    assert m.shape == (b, 8, 8)
    # layer mean of 1 (fine) and the head-averaged 2 at the top-left 2x2 block (coarse, nearest)
    assert torch.allclose(m[:, :2, :2], torch.full((b, 2, 2), 1.5))
    assert torch.allclose(m[:, 2:, :], torch.full((b, 6, 8), 0.5))
    # two class tokens are averaged: token 4's cell (1, 1) -> latent block [2:4, 2:4]
    m2 = class_attention_map(recs, [3, 4], (8, 8))
    assert torch.allclose(m2[:, 2:4, 2:4], torch.full((b, 2, 2), 0.5 * (0.5 + 1.0)))
    # non-square latent grid
    rect = [CapturedAttention("c", "cross", (2, 4), 4, torch.rand(1, 8, tlen))]
    assert class_attention_map(rect, [1], (8, 16)).shape == (1, 8, 16)


def test_preliminary_attention_shapes_on_the_real_unet(labeler):
    images = _images()
    from pseudolabel.models.foba import resize_image

    inputs = np.stack([resize_image(im, 64) for im in images])
    with torch.inference_mode():
        lat = encode_image(labeler.sd.vae, inputs)
        att, masks = labeler.preliminary(lat, "zebra")
    assert lat.shape == (2, 4, 8, 8)
    assert att.shape == (2, 8, 8) and att.dtype == np.float32
    assert np.all(att >= 0) and np.all(att <= 1) and att.std() > 0
    assert masks.shape == (2, 8, 8) and masks.dtype == bool
    # the capture processors are gone after the passes
    assert not any(type(proc).__name__ == "AttentionCaptureProcessor"
                   for proc in labeler.sd.unet.attn_processors.values())


# -- blended inpainting ---------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_blended_inpainting_reimposes_the_kept_region_before_each_step(labeler, strength):
    from diffusers import DDIMScheduler

    sd = labeler.sd
    sched = DDIMScheduler.from_config(sd.scheduler.config)
    ref = DDIMScheduler.from_config(sd.scheduler.config)   # independent copy for the expected values
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 2:6, 3:7] = 0.0                               # inpaint a 4x4 block
    emb = labeler._embed("a photo of a background")
    seen = []

    def check(i, t, latents, renoised):
        expected = ref.add_noise(z0, noise, torch.tensor([int(t)]))
        k = keep.bool().expand_as(latents)
        assert torch.allclose(latents[k], expected[k], atol=1e-6)
        assert torch.allclose(renoised, expected, atol=1e-6)
        if i > 0:   # the inpainted block evolves on its own, not as the re-noised original
            assert not torch.allclose(latents[~k], expected[~k], atol=1e-3)
        seen.append(int(t))

    with torch.inference_mode():
        out = blended_inpaint(sd.unet, sched, z0, keep, emb, noise, 6, strength=strength, callback=check)
    assert len(seen) == round(6 * strength)
    assert seen == sorted(seen, reverse=True)
    k = keep.bool().expand_as(out)
    assert torch.equal(out[k], z0[k])
    assert not torch.allclose(out[~k], z0[~k], atol=1e-3)


# -- the labeler ----------------------------------------------------------------------------------

def _check_outputs(outs, images, category="cat", category_id=1):
    assert len(outs) == len(images)
    for out, image in zip(outs, images):
        h, w = image.shape[:2]
        fg = out.layers["foreground_mask"]
        bg = out.layers["background"]
        assert fg.shape == (h, w) and fg.dtype == np.uint8 and set(np.unique(fg)) <= {0, 255}
        assert bg.shape == (h, w, 3) and bg.dtype == np.uint8
        assert len(out.instances) == (1 if fg.any() else 0)
        for inst in out.instances:
            assert inst.mask.shape == (h, w) and inst.mask.dtype == bool
            assert np.array_equal(inst.mask, fg > 0)
            assert inst.category == category and inst.category_id == category_id
            assert 0.0 <= inst.score <= 1.0


def test_labeler_from_directory_outputs_at_image_size(labeler):
    images = _images()
    outs = labeler(images)
    _check_outputs(outs, images)
    # a row can choose another ontology class
    outs2 = labeler(images[:1], [{"categories": ["zebra"]}])
    _check_outputs(outs2, images[:1], category="zebra", category_id=2)


def test_refined_mask_lies_inside_the_preliminary_mask_and_background_composites(labeler):
    from pseudolabel.models.foba import resize_image, resize_mask
    from pseudolabel.models.masks import close_and_fill

    images = _images(1)
    outs = labeler(images)
    inputs = np.stack([resize_image(im, 64) for im in images])
    with torch.inference_mode():
        _, prelim = labeler.preliminary(encode_image(labeler.sd.vae, inputs), "cat")
    assert prelim.any()
    for out, image, pm in zip(outs, images, prelim):
        region = resize_mask(pm, image.shape[:2])
        # AND with the preliminary mask, then closing + hole filling (both monotone): the final mask lies
        # inside the closed and filled preliminary mask
        closed = resize_mask(close_and_fill(resize_mask(pm, (64, 64)), 2), image.shape[:2])
        assert not (out.layers["foreground_mask"].astype(bool) & ~closed).any()
        assert np.array_equal(out.layers["background"][~region], image[~region])
        assert not np.array_equal(out.layers["background"][region], image[region])


def test_results_do_not_depend_on_the_batch(labeler):
    images = _images(2)
    alone = labeler(images[:1])[0]
    batched = labeler(images)[0]
    assert np.array_equal(alone.layers["foreground_mask"], batched.layers["foreground_mask"])
    assert np.abs(alone.layers["background"].astype(int) - batched.layers["background"].astype(int)).max() <= 1


def test_preliminary_only_mode(tiny_sd):
    spec = LabelerSpec(name="foba", weights=tiny_sd, params={**FAST, "refine": False}, ontology=[{"category": "cat"}])
    images = _images()
    outs = FoBa(spec)(images)
    _check_outputs(outs, images)
    for out, image in zip(outs, images):
        assert np.array_equal(out.layers["background"], image)


def test_labeler_needs_an_ontology(tiny_sd):
    with pytest.raises(ValueError):
        FoBa(LabelerSpec(name="foba", weights=tiny_sd, params=FAST))


def test_labeler_loads_from_s3(tiny_sd, s3_bucket, tmp_path, monkeypatch):
    from pseudolabel.storage import filesystem

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    bucket, storage = s3_bucket
    uri = f"{bucket}/models/tiny-sd"
    fs, root = filesystem(uri, storage)
    fs.put(tiny_sd.rstrip("/") + "/", root, recursive=True)
    spec = LabelerSpec(name="foba", weights=uri, params=FAST, ontology=[{"category": "cat"}])
    lab = FoBa(spec, storage=storage)
    assert list((tmp_path / "cache").rglob("diffusion_pytorch_model.safetensors"))   # copied to the node cache
    images = _images()[:1]
    outs = lab(images)
    _check_outputs(outs, images)


# -- wiring of the mask steps -----------------------------------------------------------------------

def test_preliminary_mask_is_majority_filtered_gmm_of_the_step_mean(tiny_sd, monkeypatch):
    """attention_steps=2: the maps seen at each pass, averaged over steps and layers, GMM-thresholded and
    majority-filtered, give exactly the preliminary masks."""
    import torch.nn.functional as F

    import pseudolabel.models.foba as foba_module
    from pseudolabel.models.attention import AttentionStore
    from pseudolabel.models.foba import resize_image
    from pseudolabel.models.masks import gmm_mask, majority_filter

    spec = LabelerSpec(name="foba", weights=tiny_sd, params={**FAST, "attention_steps": 2},
                       ontology=[{"category": "zebra"}])
    lab = FoBa(spec)
    passes: list[dict] = []
    real_pass = foba_module.noisy_unet_pass

    def pass_spy(unet, scheduler, latents, timestep, *args, **kwargs):
        passes.append({"t": int(timestep), "maps": {}})
        return real_pass(unet, scheduler, latents, timestep, *args, **kwargs)

    class RecordingStore(AttentionStore):
        def record(self, name, kind, hw, factor, probs):
            passes[-1]["maps"][name] = (tuple(hw), probs.float().mean(1).clone())
            super().record(name, kind, hw, factor, probs)

    monkeypatch.setattr(foba_module, "noisy_unet_pass", pass_spy)
    monkeypatch.setattr(foba_module, "AttentionStore", RecordingStore)
    inputs = np.stack([resize_image(im, 64) for im in _images(3)])
    with torch.inference_mode():
        latents = encode_image(lab.sd.vae, inputs)
        att, masks = lab.preliminary(latents, "zebra")
    assert [p["t"] for p in passes] == [781, 581]
    token_idx = class_token_indices(lab.sd.tokenizer, "a photo of a zebra", "zebra")

    per_step = []
    for p in passes:
        assert p["maps"] and all(name.endswith("attn2") for name in p["maps"])
        layer_maps = []
        for hw, probs in p["maps"].values():
            m = probs[..., token_idx].mean(-1).reshape(probs.shape[0], 1, *hw)
            layer_maps.append(F.interpolate(m, size=(8, 8), mode="nearest")[:, 0])
        per_step.append(torch.stack(layer_maps).mean(0).numpy())
    mean = np.mean(per_step, axis=0)
    assert not np.allclose(per_step[0], per_step[1], atol=1e-4)  # the steps differ, so averaging matters
    np.testing.assert_allclose(att, mean, atol=1e-6)
    expected = np.stack([majority_filter(gmm_mask(a), lab.params.majority_size) for a in mean])
    assert np.array_equal(masks, expected)
    assert not np.array_equal(masks, np.stack([gmm_mask(a) for a in mean]))  # the filter changed something
    assert not np.array_equal(masks, np.stack([majority_filter(gmm_mask(a), 3) for a in per_step[-1]]))


def test_refined_mask_is_the_closed_filled_and_of_difference_and_preliminary_masks(labeler, monkeypatch):
    """The refined mask = close_and_fill(gmm_mask(|reconstruction - plate|) & preliminary, radius), from the
    refinement's own plate, and the labeler's foreground mask is that at image size."""
    import cv2

    import pseudolabel.models.foba as foba_module
    from pseudolabel.models.attention import decode_latents
    from pseudolabel.models.foba import difference_map, resize_image, resize_mask
    from pseudolabel.models.masks import close_and_fill, gmm_mask

    decoded = []
    real_decode = foba_module.decode_latents

    def decode_spy(vae, latents):
        out = real_decode(vae, latents)
        decoded.append(out.copy())
        return out

    monkeypatch.setattr(foba_module, "decode_latents", decode_spy)
    images = _images(1)
    outs = labeler(images)
    assert len(decoded) == 2
    plates, reference = decoded   # the plate, then the reconstruction it is compared with
    inputs = np.stack([resize_image(im, 64) for im in images])
    with torch.inference_mode():
        latents = encode_image(labeler.sd.vae, inputs)
        _, prelim = labeler.preliminary(latents, "cat")
        assert np.array_equal(reference, decode_latents(labeler.sd.vae, latents))
    diff = difference_map(reference, plates)
    radius = labeler.params.closing_radius
    and_mattered = closing_mattered = False
    for j, (out, image) in enumerate(zip(outs, images)):
        region = resize_mask(prelim[j], (64, 64))
        raw = gmm_mask(diff[j])
        expected = close_and_fill(raw & region, radius)
        and_mattered |= bool((raw & ~region).any())
        closing_mattered |= not np.array_equal(expected, raw & region)
        hw = image.shape[:2]
        assert np.array_equal(out.layers["foreground_mask"] > 0, resize_mask(expected, hw))
        # the plate seen is the one composited into the background layer
        plate = cv2.resize(plates[j], (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        big = resize_mask(prelim[j], hw)
        assert np.array_equal(out.layers["background"][big], plate[big])
    assert and_mattered, "the difference mask never left the preliminary mask: the AND is untested"
    assert closing_mattered, "closing and hole filling changed nothing: they are untested"
    # the refinement step alone returns the same masks at the working resolution
    with torch.inference_mode():
        _, refined = labeler.refine(latents, inputs, prelim)
    expected = np.stack([close_and_fill(gmm_mask(d) & resize_mask(pm, (64, 64)), radius)
                         for d, pm in zip(diff, prelim)])
    assert np.array_equal(refined, expected)


# -- the two halves ---------------------------------------------------------------------------------

@pytest.mark.parametrize("params, keys", [
    ({}, {"attention", "prelim", "plate", "reference"}),
    ({"refine": False}, {"attention"}),
    ({"difference_reference": "input", "composite_background": False}, {"attention", "prelim", "plate"}),
])
def test_forward_then_host_half_equals_the_whole_labeler(tiny_sd, monkeypatch, params, keys):
    """labeler(images) == forward (rows grouped by class), each payload through the engine's byte format,
    postprocess on a host half built from the spec alone (its weights path does not even exist)."""
    from pseudolabel.engine.payload import pack_payload, unpack_payload
    from pseudolabel.models.base import Labeler

    assert FoBa.label is Labeler.label and FoBa.splits() and FoBa.has_device_half()
    spec = LabelerSpec(name="foba", weights=tiny_sd, params={**FAST, **params},
                       ontology=[{"category": "cat"}, {"category": "zebra"}])
    lab = FoBa(spec)
    images = _images() + _images(1)[:1]
    prompts = [None, {"categories": ["zebra"]}, {"category": "cat"}]
    whole = lab(images, prompts)

    batches = []
    real = lab.preliminary_attention

    def spy(latents, class_text):
        batches.append((class_text, latents.shape[0]))
        return real(latents, class_text)

    monkeypatch.setattr(lab, "preliminary_attention", spy)
    payloads = lab.forward(images, prompts)
    assert batches == [("cat", 2), ("zebra", 1)]  # one batch per class
    host = FoBa.host_half(spec.model_copy(update={"weights": "/nonexistent/foba-weights"}))
    assert not hasattr(host, "sd")

    r, h = FAST["resolution"], FAST["resolution"] // 8
    layout = {"attention": (np.float32, (h, h)), "prelim": (np.bool_, (h, h)),
              "plate": (np.uint8, (r, r, 3)), "reference": (np.uint8, (r, r, 3))}
    for image, prompt, payload, expected in zip(images, prompts, payloads, whole):
        assert set(payload) == keys
        for name, value in payload.items():
            assert type(value) is np.ndarray and (value.dtype, value.shape) == layout[name]
        out = host.postprocess(image, prompt, unpack_payload(pack_payload(payload)))
        assert_same_output(out, expected)
    assert [o.instances[0].category for o in whole if o.instances] == ["cat", "zebra", "cat"]


def test_host_half_loads_no_weights(monkeypatch):
    import pseudolabel.models.foba as foba_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the host half loaded weights")

    monkeypatch.setattr(foba_module, "load_sd_components", no_loading)
    spec = LabelerSpec(name="foba", weights="/nonexistent/foba-weights", params={**FAST, "refine": False},
                       ontology=[{"category": "cat"}, {"category": "zebra", "id": 7}])
    host = FoBa.host_half(spec)
    assert host.device == "cpu" and not hasattr(host, "sd")
    with pytest.raises(AssertionError, match="loaded weights"):
        FoBa(spec)  # the full labeler does load them
    with pytest.raises(ValueError):
        FoBa.host_half(LabelerSpec(name="foba", weights="/nonexistent", params=FAST))  # no ontology
    # a payload made by hand: a bright 4x4 block in the 8x8 attention map
    att = np.full((8, 8), 0.01, np.float32)
    att[2:6, 2:6] = 0.5
    image = np.full((32, 32, 3), 90, np.uint8)
    out = host.postprocess(image, {"category": "zebra"}, {"attention": att})
    (inst,) = out.instances
    cells = att > 0.1
    cells[[2, 2, 5, 5], [2, 5, 2, 5]] = False  # the 3x3 majority filter takes the block's corners
    expected = np.kron(cells, np.ones((4, 4), bool))
    assert (inst.category, inst.category_id, inst.score) == ("zebra", 7, 1.0)
    assert np.array_equal(inst.mask, expected) and np.array_equal(out.layers["background"], image)


def test_compile_wraps_the_inpainting_unet(tiny_sd, monkeypatch):
    """compile: true routes the inpainting loop's UNet passes through ``compiled`` (labels unchanged)."""
    import pseudolabel.models.foba as foba_module

    calls = []

    def fake_compiled(fn, enabled, what):
        assert what == "foba"
        if not enabled:
            return fn

        def run(*args, **kwargs):
            calls.append(1)
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(foba_module, "compiled", fake_compiled)
    spec = LabelerSpec(name="foba", weights=tiny_sd, params=FAST, ontology=[{"category": "cat"}], compile=True)
    images = _images()[:1]
    out = FoBa(spec)(images)
    assert len(calls) == FAST["inpaint_steps"]
    assert_same_output(out[0], FoBa(spec.model_copy(update={"compile": False}))(images)[0])
