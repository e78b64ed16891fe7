"""foba labeler on tiny random Stable Diffusion checkpoints: token arithmetic, attention averaging, the
DDIM inpainting loop, two checkpoints (attention / inpainting), the segmentation network, loading from a
directory and from s3://, masks and layers at image size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from halves import assert_same_output

from pseudolabel.models.attention import (
    CapturedAttention,
    load_sd_components,
)
from pseudolabel.models.foba import (
    FoBa,
    attention_timesteps,
    blended_inpaint,
    class_attention_map,
    class_token_indices,
)
from pseudolabel.models.foba_steps import (
    compose_refined_mask,
    ddim_schedule,
    long_edge_size,
    q_sample,
    resize_long_edge,
    suggest_mask,
    unpad_canvas,
)
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.spec import LabelerSpec

FAST = {"resolution": 64, "attention_steps": 4, "attention_stride": 200, "inpaint_steps": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from foba_tiny import build_tiny_foba

    return build_tiny_foba(str(tmp_path_factory.mktemp("foba_pair")))


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


def _canvas_latents(lab, images):
    canvases, parts = lab.canvas(images, lab.params.resolution)
    lat = lab.params.resolution // 8
    noise = lab._noise_plan(len(images), (4, lat, lat))
    return lab.encode(canvases, noise["vae"][0]), noise, parts


def test_preliminary_attention_shapes_on_the_real_unet(labeler):
    images = _images()
    with torch.inference_mode():
        lat, _, parts = _canvas_latents(labeler, images)
        att, masks = labeler.preliminary(lat, "zebra")
    assert parts == [(48, 64), (64, 64)]
    assert lat.shape == (2, 4, 8, 8)
    assert att.shape == (2, 8, 8) and att.dtype == np.float32
    assert np.all(att >= 0) and np.all(att <= 1) and att.std() > 0
    assert masks.shape == (2, 8, 8) and masks.dtype == bool
    assert np.array_equal(masks, np.stack([suggest_mask(a) for a in att]))
    # the capture processors are gone after the passes
    assert not any(type(proc).__name__ == "AttentionCaptureProcessor"
                   for proc in labeler.sd.unet.attn_processors.values())


def test_canvas_pads_the_long_edge_resized_image(labeler):
    canvases, parts = labeler.canvas(_images(), 64)
    assert canvases.shape == (2, 64, 64, 3) and parts[0] == (48, 64)
    assert np.array_equal(canvases[0, :48], resize_long_edge(_images()[0], 64))
    assert not canvases[0, 48:].any()                       # black padding below the image


# -- the DDIM inpainting loop -----------------------------------------------------------------------

def _inpaint_by_hand(abar, z0, keep, x_T, step_noise, num_steps, eps_of):
    """The blended inpainting loop written out: per step, blend (kept region q-sampled to t), then one
    eta-0 DDIM step with ``eps_of(latents, t)``; returns the latents and the schedule."""
    ts, a_t, a_prev = ddim_schedule(abar, num_steps)
    img = x_T.clone()
    for i, t in enumerate(ts):
        img = keep * q_sample(z0, step_noise[i], float(abar[t])) + (1 - keep) * img
        eps = eps_of(img, t)
        x0 = (img - (1 - a_t[i]).sqrt().float() * eps) / a_t[i].sqrt().float()
        img = a_prev[i].sqrt().float() * x0 + (1 - a_prev[i]).sqrt().float() * eps
    return img, ts


def test_inpainting_loop_q_samples_the_kept_region_with_fresh_noise_each_step(labeler):
    sd = labeler.sd
    abar = sd.scheduler.alphas_cumprod.double()
    g = torch.Generator().manual_seed(3)
    z0, x_T = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    step_noise = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(4)]
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 2:6, 3:7] = 0.0                               # inpaint a 4x4 block
    emb = labeler._embed("a photo of a background")
    seen = []

    def check(i, t, latents, renoised):
        expected = q_sample(z0, step_noise[i], float(abar[t]))
        k = keep.bool().expand_as(latents)
        assert torch.allclose(renoised, expected, atol=1e-6)
        assert torch.allclose(latents[k], expected[k], atol=1e-6)
        if i == 0:                                          # random x_T in the inpainted region
            assert torch.equal(latents[~k], x_T[~k])
        seen.append(t)

    with torch.inference_mode():
        out = blended_inpaint(sd.unet, abar, z0, keep, emb, x_T, step_noise, 4, callback=check)
        # the same loop by hand: blend, one eta-0 DDIM step (schedule 751, 501, 251, 1)
        img, ts = _inpaint_by_hand(abar, z0, keep, x_T, step_noise, 4,
                                   lambda x, t: sd.unet(x, torch.tensor([t]), encoder_hidden_states=emb).sample)
    assert seen == ts == [751, 501, 251, 1]
    assert torch.allclose(out, img, atol=1e-5)
    with pytest.raises(ValueError):
        blended_inpaint(sd.unet, abar, z0, keep, emb, x_T, step_noise[:2], 4)


def test_inpainting_loop_with_classifier_free_guidance(labeler):
    """guidance_scale > 1: each step's noise is eps_u + g (eps_c - eps_u), the UNet run once on the
    batch of both embeddings; the same loop written by hand agrees, and an unconditional embedding
    equal to the prompt's gives the unguided result."""
    sd = labeler.sd
    abar = sd.scheduler.alphas_cumprod.double()
    g = torch.Generator().manual_seed(5)
    z0, x_T = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    step_noise = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]
    keep = torch.ones(2, 1, 8, 8)
    keep[:, :, 1:5, 2:7] = 0.0
    cond, uncond = labeler._embed("a photo of a background"), labeler._embed("a photo of a cat")
    scale = 7.5
    with torch.inference_mode():
        out = blended_inpaint(sd.unet, abar, z0, keep, cond, x_T, step_noise, 3, guidance_scale=scale,
                              uncond_embeddings=uncond)

        def guided(x, t):
            tt = torch.full((2,), t)
            eps_c = sd.unet(x, tt, encoder_hidden_states=cond.expand(2, -1, -1)).sample
            eps_u = sd.unet(x, tt, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
            return eps_u + scale * (eps_c - eps_u)

        img, _ = _inpaint_by_hand(abar, z0, keep, x_T, step_noise, 3, guided)
        plain = blended_inpaint(sd.unet, abar, z0, keep, cond, x_T, step_noise, 3)
        same = blended_inpaint(sd.unet, abar, z0, keep, cond, x_T, step_noise, 3, guidance_scale=scale,
                               uncond_embeddings=cond)
    assert torch.allclose(out, img, atol=1e-4)
    assert not torch.allclose(out, plain, atol=1e-3)  # the guidance changes the result
    assert torch.allclose(same, plain, atol=1e-4)
    with pytest.raises(ValueError, match="uncond_embeddings"):
        blended_inpaint(sd.unet, abar, z0, keep, cond, x_T, step_noise, 3, guidance_scale=scale)


def test_labeler_with_guidance_runs_twice_the_unet_batch(tiny_sd, monkeypatch):
    """``guidance_scale`` in the labeler's params: the inpainting passes carry the doubled batch (the
    class prompt as the unconditional side) and the labels differ from the unguided labeler's."""
    import pseudolabel.models.foba as foba_module

    spec = {"name": "foba", "weights": tiny_sd, "ontology": [{"category": "cat"}]}
    plain = labeler_class("foba")(LabelerSpec(**spec, params=FAST))
    guided = labeler_class("foba")(LabelerSpec(**spec, params={**FAST, "guidance_scale": 5.0}))
    seen: list[tuple[float, bool]] = []
    real = foba_module.blended_inpaint

    def watch(*args, **kwargs):
        seen.append((kwargs["guidance_scale"], kwargs["uncond_embeddings"] is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(foba_module, "blended_inpaint", watch)
    images = _images()
    a, b = plain(images), guided(images)
    assert seen == [(1.0, False), (5.0, True)]
    assert len(a) == len(b) == 2
    assert any(not np.array_equal(x.layers["background"], y.layers["background"]) for x, y in zip(a, b))


# -- the labeler ----------------------------------------------------------------------------------

def _check_outputs(outs, images, category="cat", category_id=1, layers=("background", "foreground_mask")):
    assert len(outs) == len(images)
    for out, image in zip(outs, images):
        h, w = image.shape[:2]
        assert set(out.layers) == set(layers)
        fg = out.layers["foreground_mask"]
        assert fg.shape == (h, w) and fg.dtype == np.uint8 and set(np.unique(fg)) <= {0, 255}
        if "background" in layers:
            bg = out.layers["background"]
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


def test_row_class_from_the_row_prompt(labeler):
    """A row's explicit ``category`` wins; else the first of its ``categories`` (names or ids) that the
    ontology holds (a COCO input lists every ground-truth category of the image); else the default."""
    cat, zebra = labeler.ontology
    assert labeler._row_entry(None) is cat and labeler._row_entry({"boxes_xyxy": [[0, 0, 4, 4]]}) is cat
    assert labeler._row_entry({"category": "zebra"}) is zebra
    assert labeler._row_entry({"categories": ["person", "zebra", "cat"]}) is zebra
    assert labeler._row_entry({"categories": ["person", 2]}) is zebra
    with pytest.raises(ValueError, match=r"none of the row's categories \['person', 'dog'\] is in the job's ontology"):
        labeler._row_entry({"categories": ["person", "dog"]})
    with pytest.raises(ValueError, match="'horse' is not in the job's ontology"):
        labeler._row_entry({"category": "horse"})


def test_two_checkpoints_attention_from_weights_inpainting_from_inpaint_weights(pair):
    from diffusers import UNet2DConditionModel

    spec = LabelerSpec(name="foba", weights=pair["base"], params={**FAST, "inpaint_weights": pair["inpaint"]},
                       ontology=[{"category": "cat"}])
    lab = FoBa(spec)
    assert lab.weight_sources() == [pair["base"], pair["inpaint"]]
    ft = UNet2DConditionModel.from_pretrained(pair["inpaint"], subfolder="unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(pair["base"], subfolder="unet").state_dict()
    key = next(iter(ft))
    assert torch.equal(lab.inpaint_unet.state_dict()[key], ft[key])
    assert torch.equal(lab.sd.unet.state_dict()[key], base[key]) and not torch.equal(base[key], ft[key])
    one = FoBa(spec.model_copy(update={"params": {**FAST}}))
    assert one.inpaint_unet is one.sd.unet and one.weight_sources() == [pair["base"]]
    images = _images()
    a, b = lab.forward(images, [None, None]), one.forward(images, [None, None])
    for pa, pb in zip(a, b):
        assert np.array_equal(pa["attention"], pb["attention"])      # the same base model attends
        assert not np.array_equal(pa["plate"], pb["plate"])          # another model inpaints
    _check_outputs(lab(images), images)


def test_refined_mask_from_a_payload_by_hand(tiny_sd):
    """Host half: refined = GMM+orphan(|resized input - plate| on [0, 1]) AND the bilinearly upsampled
    preliminary mask, cropped to the image part, nearest-resized to the image; closing is opt-in."""
    spec = LabelerSpec(name="foba", weights="/nonexistent", params=FAST, ontology=[{"category": "cat"}])
    host = FoBa.host_half(spec)
    image = np.full((36, 48, 3), 100, np.uint8)             # part (48, 64) on the 64 canvas
    part = long_edge_size(image.shape[:2], 64)
    assert part == (48, 64)
    plate = resize_long_edge(image, 64).copy()
    plate[10:40, 8:50] = 250                                # changed by the inpainting
    plate[23:26, 27:30] = 100                               # a 3x3 hole inside it (kept by the orphan filter)
    prelim = np.zeros((8, 8), bool)
    prelim[1:4, 1:5] = True                                 # canvas rows 8..31 -> upsampled 4..35
    att = np.where(prelim, 0.6, 0.1).astype(np.float32)
    out = host.postprocess(image, None, {"attention": att, "prelim": prelim, "plate": plate})
    refined = compose_refined_mask(resize_long_edge(image, 64), plate, prelim, 64)
    assert refined.any() and not refined[36:].any() and not refined[:, 44:].any()
    import cv2
    expected = cv2.resize(refined.astype(np.uint8), (48, 36), interpolation=cv2.INTER_NEAREST).astype(bool)
    assert np.array_equal(out.layers["foreground_mask"] > 0, expected)
    # the background layer: the plate inside the upsampled preliminary region, the input elsewhere
    assert np.array_equal(out.layers["background"][-1], image[-1])
    # closing + fill (opt-in) fills the hole
    assert not refined[24, 28]
    closed = FoBa.host_half(spec.model_copy(update={"params": {**FAST, "closing_radius": 1}}))
    out2 = closed.postprocess(image, None, {"attention": att, "prelim": prelim, "plate": plate})
    assert out2.layers["foreground_mask"][18, 21] == 255 and out.layers["foreground_mask"][18, 21] == 0


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


def test_labeler_loads_both_checkpoints_from_s3(pair, s3_bucket, tmp_path, monkeypatch):
    from pseudolabel.storage import filesystem

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    bucket, storage = s3_bucket
    uris = {}
    for name in ("base", "inpaint"):
        uris[name] = f"{bucket}/models/{name}"
        fs, root = filesystem(uris[name], storage)
        fs.put(pair[name].rstrip("/") + "/", root, recursive=True)
    spec = LabelerSpec(name="foba", weights=uris["base"], params={**FAST, "inpaint_weights": uris["inpaint"]},
                       ontology=[{"category": "cat"}])
    lab = FoBa(spec, storage=storage)
    assert len(list((tmp_path / "cache").rglob("unet/diffusion_pytorch_model.safetensors"))) == 2
    images = _images()[:1]
    _check_outputs(lab(images), images)


def test_segmentation_network_mode(tmp_path):
    """With segmentation_weights the network alone labels: probability >= threshold at image size."""
    import cv2
    from foba_tiny import build_tiny_segnet

    from pseudolabel.models.foba_segnet import load_segnet, segnet_input

    path = build_tiny_segnet(str(tmp_path / "segnet"), width=2, resolution=16)
    spec = LabelerSpec(name="foba", weights="/nonexistent/sd", ontology=[{"category": "cat"}],
                       params={"segmentation_weights": path, "segmentation_threshold": 0.5})
    lab = FoBa(spec)
    assert not hasattr(lab, "sd") and lab.weight_sources() == [path]
    images = _images()
    payloads = lab.forward(images, [None, None])
    assert payloads[0]["probability"].shape == (16, 21) and payloads[0]["probability"].dtype == np.float16
    net, res = load_segnet(path)
    with torch.inference_mode():
        prob = net(segnet_input(images[0], res))[0, 0].half().float().numpy()
    big = cv2.resize(prob, (96, 72), interpolation=cv2.INTER_LINEAR)
    outs = lab(images)
    _check_outputs(outs, images, layers=("foreground_mask",))
    assert np.array_equal(outs[0].layers["foreground_mask"] > 0, big >= 0.5)
    low = FoBa(spec.model_copy(update={"params": {"segmentation_weights": path, "segmentation_threshold": 0.01}}))
    assert (low(images)[0].layers["foreground_mask"] > 0).sum() >= (big >= 0.5).sum()


# -- wiring of the mask steps -----------------------------------------------------------------------

def test_preliminary_mask_is_suggest_mask_of_the_step_mean(tiny_sd, monkeypatch):
    """attention_steps=2: the maps seen at each pass, averaged over steps and layers, through the GMM and
    the orphan filter, give exactly the preliminary masks."""
    import torch.nn.functional as F

    import pseudolabel.models.foba as foba_module
    from pseudolabel.models.attention import AttentionStore

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
    with torch.inference_mode():
        latents, _, _ = _canvas_latents(lab, _images(3))
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
    assert np.array_equal(masks, np.stack([suggest_mask(a) for a in mean]))


def test_forward_refines_with_its_own_inpainting(labeler, monkeypatch):
    """The payload's plate is the decoded DDIM result cropped to the image part, and the labeler's mask
    is compose_refined_mask of it, resized to the image."""
    import cv2

    import pseudolabel.models.foba as foba_module

    decoded = []
    real_decode = foba_module.decode_latents

    def decode_spy(vae, latents):
        out = real_decode(vae, latents)
        decoded.append(out.copy())
        return out

    monkeypatch.setattr(foba_module, "decode_latents", decode_spy)
    images = _images(1)
    payloads = labeler.forward(images, [None, None])
    assert len(decoded) == 1                                 # no reconstruction by default
    for j, (image, payload) in enumerate(zip(images, payloads)):
        part = long_edge_size(image.shape[:2], 64)
        assert np.array_equal(payload["plate"], unpad_canvas(decoded[0][j], part))
        out = labeler.postprocess(image, None, payload)
        refined = compose_refined_mask(resize_long_edge(image, 64), payload["plate"], payload["prelim"], 64)
        hw = image.shape[:2]
        expected = cv2.resize(refined.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST) > 0
        assert np.array_equal(out.layers["foreground_mask"] > 0, expected)


# -- the two halves ---------------------------------------------------------------------------------

@pytest.mark.parametrize("params, keys", [
    ({}, {"attention", "prelim", "plate"}),
    ({"refine": False}, {"attention"}),
    ({"difference_reference": "reconstruction", "composite_background": False, "closing_radius": 2},
     {"attention", "prelim", "plate", "reference"}),
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

    def spy(latents, class_text, noises=None):
        batches.append((class_text, latents.shape[0]))
        return real(latents, class_text, noises)

    monkeypatch.setattr(lab, "preliminary_attention", spy)
    payloads = lab.forward(images, prompts)
    assert batches == [("cat", 2), ("zebra", 1)]  # one batch per class
    host = FoBa.host_half(spec.model_copy(update={"weights": "/nonexistent/foba-weights"}))
    assert not hasattr(host, "sd")

    r, h = FAST["resolution"], FAST["resolution"] // 8
    for image, prompt, payload, expected in zip(images, prompts, payloads, whole):
        part = long_edge_size(image.shape[:2], r)
        layout = {"attention": (np.float32, (h, h)), "prelim": (np.bool_, (h, h)),
                  "plate": (np.uint8, part + (3,)), "reference": (np.uint8, part + (3,))}
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
    cells[[2, 2, 5, 5], [2, 5, 2, 5]] = False  # the orphan filter takes the block's corners (4 of 9)
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
