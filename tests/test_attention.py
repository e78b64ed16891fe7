"""Attention capture on a tiny random Stable Diffusion loaded through the real loading path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pseudolabel.models.attention import (
    AttentionStore,
    attention_modules,
    capture_attention,
    decode_latents,
    encode_image,
    encode_text,
    grid_for_length,
    load_sd_components,
    noisy_unet_pass,
    per_row_noise,
)


@pytest.fixture(scope="module")
def sd_dir(tiny_sd):
    return tiny_sd


@pytest.fixture(scope="module")
def sd(sd_dir):
    return load_sd_components(sd_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def inputs(sd):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 64, 128, 3), dtype=np.uint8)  # non-square on purpose
    with torch.inference_mode():
        latents = encode_image(sd.vae, images)
        emb, ids = encode_text(sd.tokenizer, sd.text_encoder, ["a photo of a cat", "a photo of a dog"])
    return latents, emb, ids


def _pass(sd, latents, emb, seed=0, t=100):
    with torch.inference_mode():
        return noisy_unet_pass(sd.unet, sd.scheduler, latents, t, emb, generator=torch.Generator().manual_seed(seed))


def test_components_and_encoders(sd, inputs):
    latents, emb, ids = inputs
    assert latents.shape == (2, 4, 8, 16) and latents.dtype == torch.float32
    assert emb.shape == (2, sd.tokenizer.model_max_length, sd.text_encoder.config.hidden_size)
    assert ids.shape == (2, sd.tokenizer.model_max_length)
    with torch.inference_mode():
        raw = sd.vae.encode(-torch.ones(1, 3, 64, 64)).latent_dist.mean
        scaled = encode_image(sd.vae, np.zeros((1, 64, 64, 3), dtype=np.uint8))
        images = decode_latents(sd.vae, latents)
    # uint8 0 is -1 in the VAE's input range; latents carry the scaling factor
    assert torch.allclose(scaled, raw * sd.vae.config.scaling_factor, atol=1e-4)
    assert images.shape == (2, 64, 128, 3) and images.dtype == np.uint8


def test_grid_derivation():
    assert grid_for_length(8 * 16, (8, 16)) == ((8, 16), 1)
    assert grid_for_length(4 * 8, (8, 16)) == ((4, 8), 2)
    assert grid_for_length(1 * 2, (8, 16)) == ((1, 2), 8)
    assert grid_for_length(4 * 4, (7, 7)) == ((4, 4), 2)  # odd sizes round up like stride-2 convs
    assert grid_for_length(64 * 64, None) == ((64, 64), 1)
    with pytest.raises(ValueError):
        grid_for_length(7, (8, 16))


def test_capture_rows_shapes_and_unchanged_output(sd, inputs):
    latents, emb, _ = inputs
    reference = _pass(sd, latents, emb)
    with capture_attention(sd.unet) as store:
        captured_out = _pass(sd, latents, emb)
    assert torch.allclose(reference, captured_out, atol=1e-5)

    modules = list(attention_modules(sd.unet))
    assert set(store.maps) == {name for name, _, _ in modules}
    expected_grid = {1: (8, 16), 2: (4, 8), 4: (2, 4), 8: (1, 2)}
    for name, _, kind in modules:
        rec = store.maps[name]
        assert rec.kind == kind
        assert rec.hw == expected_grid[rec.factor]
        lq = rec.hw[0] * rec.hw[1]
        lk = lq if kind == "self" else emb.shape[1]
        assert rec.probs.shape == (2, lq, lk)
        assert rec.probs.dtype == torch.float32
        assert torch.allclose(rec.probs.sum(-1), torch.ones(2, lq), atol=1e-5)
        assert (rec.probs >= 0).all()
    # the level each block sits at, as in SD
    assert store.maps["down_blocks.0.attentions.0.transformer_blocks.0.attn1"].factor == 1
    assert store.maps["up_blocks.1.attentions.0.transformer_blocks.0.attn2"].factor == 4
    assert store.maps["mid_block.attentions.0.transformer_blocks.0.attn1"].factor == 8
    groups = store.by_resolution("cross")
    assert set(groups) == {(8, 16), (4, 8), (2, 4), (1, 2)}
    means = store.mean_by_resolution("self")
    assert means[(4, 8)].shape == (2, 32, 32)


def test_filters_per_head_and_memory_bound(sd, inputs):
    latents, emb, _ = inputs
    explicit = AttentionStore(kind="cross", factors=[2, 4], per_head=True, device="cpu")
    with capture_attention(sd.unet, explicit) as store:
        _pass(sd, latents, emb)
    assert store is explicit
    with pytest.raises(TypeError):
        with capture_attention(sd.unet, explicit, kind="self"):
            pass
    assert store.maps, "nothing captured"
    for rec in store.maps.values():
        assert rec.kind == "cross" and rec.factor in (2, 4)
        heads = dict((n, m) for n, m, _ in attention_modules(sd.unet))[rec.name].heads
        assert rec.probs.shape == (2, heads, rec.hw[0] * rec.hw[1], emb.shape[1])
        assert torch.allclose(rec.probs.sum(-1), torch.ones_like(rec.probs[..., 0]), atol=1e-5)
    n_expected = sum(1 for n, _, k in attention_modules(sd.unet)
                     if k == "cross" and not n.startswith(("down_blocks.0", "up_blocks.3", "mid_block")))
    assert len(store.maps) == n_expected

    with capture_attention(sd.unet, layers=["up_blocks.3"], kind="self", resolutions=[(8, 16)]) as store:
        _pass(sd, latents, emb)
    assert set(store.maps) == {n for n, _, k in attention_modules(sd.unet)
                               if n.startswith("up_blocks.3.") and k == "self"}


def test_processors_restored(sd, inputs):
    latents, emb, _ = inputs
    before = {name: m.processor for name, m, _ in attention_modules(sd.unet)}
    with capture_attention(sd.unet):
        assert all(type(m.processor).__name__ == "AttentionCaptureProcessor" for _, m, _ in attention_modules(sd.unet))
    assert {name: m.processor for name, m, _ in attention_modules(sd.unet)} == before
    with pytest.raises(RuntimeError):
        with capture_attention(sd.unet):
            raise RuntimeError("boom")
    assert {name: m.processor for name, m, _ in attention_modules(sd.unet)} == before
    assert not sd.unet._forward_pre_hooks


def test_running_mean_over_steps(sd, inputs):
    latents, emb, _ = inputs
    singles = []
    for t in (100, 500, 900):
        with capture_attention(sd.unet, kind="cross", factors=[2]) as store:
            _pass(sd, latents, emb, seed=t, t=t)
        singles.append({k: v.probs for k, v in store.maps.items()})
    with capture_attention(sd.unet, kind="cross", factors=[2], average=True) as avg:
        for t in (100, 500, 900):
            _pass(sd, latents, emb, seed=t, t=t)
    for name, rec in avg.maps.items():
        assert rec.count == 3
        expected = torch.stack([s[name] for s in singles]).mean(0)
        assert torch.allclose(rec.probs, expected, atol=1e-5)
    assert not torch.allclose(singles[0][name], singles[2][name])


def test_noisy_pass_seeded(sd, inputs):
    latents, emb, _ = inputs
    a, b, c = _pass(sd, latents, emb, seed=1), _pass(sd, latents, emb, seed=1), _pass(sd, latents, emb, seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 100])
    with torch.inference_mode():
        manual = sd.unet(sd.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=emb).sample
    assert torch.allclose(a, manual, atol=1e-5)


def test_per_row_noise_does_not_depend_on_the_batch():
    shape = (4, 3, 5)
    batch = per_row_noise(3, shape, seed=7, count=2)
    alone = per_row_noise(1, shape, seed=7, count=2)
    assert [n.shape for n in batch] == [(3, *shape)] * 2 and batch[0].dtype == torch.float32
    for k in range(2):
        for j in range(3):
            assert torch.equal(batch[k][j], alone[k][0])  # any position = alone
    assert not torch.allclose(batch[0], batch[1])  # successive draws differ
    g = torch.Generator().manual_seed(7)
    assert torch.equal(alone[0][0], torch.randn(shape, generator=g))
    assert torch.equal(alone[1][0], torch.randn(shape, generator=g))
    assert not torch.allclose(per_row_noise(1, shape, seed=8)[0], alone[0])
    assert per_row_noise(0, shape, seed=7)[0].shape == (0, *shape)


def test_per_row_noise_on_a_device_in_a_dtype():
    """With device/dtype a row is the (1, *shape) draw of a fresh generator of that device in that dtype:
    on CUDA what torch.manual_seed(seed); torch.randn_like(latent) gives for one latent."""
    shape = (4, 3, 5)
    (noise,) = per_row_noise(2, shape, seed=1101, device="cpu", dtype=torch.float64)
    assert noise.dtype == torch.float64 and noise.shape == (2, *shape)
    ref = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(1101), dtype=torch.float64)[0]
    assert torch.equal(noise[0], ref) and torch.equal(noise[1], ref)
    assert not torch.equal(noise[0].float(), per_row_noise(1, shape, seed=1101)[0][0])  # not a cast of float32
    assert per_row_noise(0, shape, seed=1, device="cpu", dtype=torch.float16)[0].dtype == torch.float16


def test_head_average_accumulates_in_float32_without_a_float32_copy_of_all_heads():
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    heads, lq, lk = 8, 256, 128
    probs32 = torch.rand(2, heads, lq, lk, generator=g).softmax(-1)
    # float32 results are unchanged: the plain mean over heads
    store = AttentionStore()
    store.record("a", "self", (16, 16), 1, probs32)
    assert store.maps["a"].probs.dtype == torch.float32
    assert torch.equal(store.maps["a"].probs, probs32.mean(1))
    # half precision: float32 accumulation (exact up to float32 rounding of the sum)
    probs16 = probs32.half()
    exact = probs16.double().mean(1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        store.record("b", "self", (16, 16), 1, probs16)
    out = store.maps["b"].probs
    assert out.dtype == torch.float32 and out.shape == (2, lq, lk)
    assert (out.double() - exact).abs().max() < 1e-7
    # no allocation as large as a float32 copy of all heads (one head's worth is allowed)
    full_copy = probs16.numel() * 4
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < full_copy / 2, (largest, full_copy)


def test_load_from_s3(sd_dir, s3_bucket, sd, tmp_path, monkeypatch):
    from pseudolabel.storage import filesystem

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    bucket, storage = s3_bucket
    fs, root = filesystem(f"{bucket}/sd", storage)
    fs.put(sd_dir, root, recursive=True)
    remote = load_sd_components(f"{bucket}/sd", storage=storage, dtype="float32")
    for a, b in zip(remote.unet.state_dict().values(), sd.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert type(remote.scheduler).__name__ == "DDIMScheduler"
    assert remote.tokenizer("a cat").input_ids == sd.tokenizer("a cat").input_ids
