"""The SeFM network, its checkpoints, training, and the ``incontext`` labeler's sefm backend."""
from __future__ import annotations

import json
import math
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

#: a tiny ``sefm-small`` (the lighter architecture)
TINY = dict(arch="sefm-small", width=8, enc_blocks=[1, 1], dec_blocks=[1], refine_blocks=0, heads=[1, 2],
            ffn_expansion=2.0, cell=32)
#: a tiny ``sefm`` (the published TSA U-Net layout): width 4, one block per stage, 4×4 windows
REF_TINY = dict(arch="sefm", width=4, enc_blocks=[1, 1, 1, 1], middle_blocks=1, dec_blocks=[1, 1, 1, 1], window=4,
                cell=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_png(path, rgb):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(path)


def _demo_pair(tmp_path, size=48, seed=0):
    from pseudolabel.jobs.demo.data import add_watermark, render_scene

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
    from pseudolabel.jobs.training.incontext import train_incontext

    bucket, storage = s3_bucket
    # 1. a few steps on a fixed set of synthesised pairs lower the answer-cell L1
    summary = train_incontext({
        "output": f"{bucket}/sefm-tiny", "storage": storage.model_dump(), "model": TINY, "image_size": 32,
        "pool_size": 8, "examples": 4, "batch_size": 4, "steps": 40, "lr": 1e-2, "warmup_steps": 3,
        "log_every": 5, "seed": 0, "threads": 1, "components": ["watermark", "logo"], "scene_components": 1,
        "component_weight": 4.0, "grad_clip": 1.0, "adversarial_weight": 0.0,
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
    from pseudolabel.jobs.demo.data import add_watermark, render_scene

    rng = np.random.default_rng(7)
    clean = render_scene(rng, 40, shadow_prob=0.0, watermark_prob=0.0).clean
    query, _ = add_watermark(clean, rng)
    out = lab([query])[0]
    assert out.layers["clean"].shape == query.shape and out.layers["clean"].dtype == np.uint8
    assert not np.array_equal(out.layers["clean"], query)
    np.testing.assert_array_equal(decode_query(out.layers["clean"], out.layers["component"]), query)


# ------------------------------------------------------------------------------------------------
# A non-identity network: the checkpoint's weights perturbed with a seed
# ------------------------------------------------------------------------------------------------

def perturbed_checkpoint(directory, seed=0, std=0.02, temperature=None, base=TINY, **config) -> str:
    """A SeFM checkpoint (``base`` config: a tiny sefm-small by default) whose weights are moved by
    N(0, std) (seeded) so that it changes its input; the output bias is zeroed (the change depends on
    the content, not a constant shift) and ``temperature``, when given, sharpens the attention (more
    weight on the demonstration cells)."""
    torch.manual_seed(seed)
    net = SeFM(SeFMConfig(**{**base, **config}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("temperature") and temperature is not None:
                param.fill_(temperature)
            else:
                param.add_(torch.randn(param.shape, generator=gen) * std)
        (net.out if net.config.arch == "sefm-small" else net.ending).bias.zero_()
    net.save_pretrained(str(directory))
    return str(directory)


def _watermarked_queries(seed=7, sizes=((40, 56), (64, 48))):
    from pseudolabel.jobs.demo.data import add_watermark, render_scene

    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        clean = cv.resize(render_scene(rng, max(h, w), shadow_prob=0.0, watermark_prob=0.0).clean, h, w)
        out.append(add_watermark(clean, rng)[0])
    return out


def _sefm(weights, demo_in, demo_out, dtype="auto", **params):
    spec = LabelerSpec(name="incontext", weights=weights, dtype=dtype,
                       params={"backend": "sefm", "demo_in": demo_in, "demo_out": demo_out, **params})
    return labeler_class("incontext")(spec)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sefm_runs_in_the_requested_dtype(tmp_path, dtype):
    ck = perturbed_checkpoint(tmp_path / "ck")
    demo_in, demo_out = _demo_pair(tmp_path)
    queries = _watermarked_queries()
    reference = [o.layers["clean"] for o in _sefm(ck, demo_in, demo_out, dtype="float32")(queries)]
    lab = _sefm(ck, demo_in, demo_out, dtype=dtype)
    assert {p.dtype for p in lab.net.parameters()} == {getattr(torch, dtype)}
    outs = lab(queries)
    for q, ref, out in zip(queries, reference, outs):
        clean, comp = out.layers["clean"], out.layers["component"]
        assert clean.shape == comp.shape == q.shape and clean.dtype == comp.dtype == np.uint8
        np.testing.assert_array_equal(decode_query(clean, comp), q)
        assert np.abs(ref.astype(int) - q.astype(int)).mean() > 2  # the network does change the query...
        err = np.abs(clean.astype(int) - ref.astype(int))
        assert err.mean() < 1.0 and err.max() <= 8, (err.mean(), err.max())  # ...and about as in float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_identity_network_is_exact_in_half_precision(tmp_path, dtype):
    """The change is measured against the query as the network saw it (rounded to its dtype)."""
    demo_in, demo_out = _demo_pair(tmp_path)
    lab = _sefm(None, demo_in, demo_out, dtype=dtype, allow_untrained=True, cell=32)
    assert next(lab.net.parameters()).dtype == getattr(torch, dtype)
    queries = _watermarked_queries()
    for q, out in zip(queries, lab(queries)):
        np.testing.assert_array_equal(out.layers["clean"], q)
        assert out.instances == []


def test_sefm_auto_dtype_on_cpu_is_float32(tmp_path):
    ck = perturbed_checkpoint(tmp_path / "ck")
    demo_in, demo_out = _demo_pair(tmp_path)
    queries = _watermarked_queries(sizes=((40, 40),))
    auto = _sefm(ck, demo_in, demo_out, dtype="auto")
    assert {p.dtype for p in auto.net.parameters()} == {torch.float32}
    fp32 = _sefm(ck, demo_in, demo_out, dtype="float32")
    np.testing.assert_array_equal(auto(queries)[0].layers["clean"], fp32(queries)[0].layers["clean"])


def test_several_pairs_give_the_mean_of_single_pair_results(tmp_path):
    from pseudolabel.jobs.demo.data import add_watermark, render_scene

    ck = perturbed_checkpoint(tmp_path / "ck", std=0.05, temperature=10.0)
    a_in, a_out = _demo_pair(tmp_path, seed=0)
    # a second, different pair: another scene, a bold red watermark
    rng = np.random.default_rng(21)
    clean = render_scene(rng, 48, shadow_prob=0.0, watermark_prob=0.0).clean
    marked = add_watermark(clean, rng, text="XY", opacity=0.9, color=(250, 30, 30))[0]
    b_in, b_out = _write_png(tmp_path / "b_in.png", marked), _write_png(tmp_path / "b_out.png", clean)
    queries = _watermarked_queries()
    only_a = _sefm(ck, a_in, a_out)(queries)
    only_b = _sefm(ck, b_in, b_out)(queries)
    both = _sefm(ck, [a_in, b_in], [a_out, b_out])(queries)
    for q, oa, ob, o2 in zip(queries, only_a, only_b, both):
        ca, cb, c2 = (o.layers["clean"].astype(np.float64) for o in (oa, ob, o2))
        # the pairs lead to different answers, so the combination is not trivially either one
        assert np.abs(ca - cb).mean() > 1.0 and np.abs(ca - cb).max() >= 8
        # mean of the per-pair clean images, rounded once (each single result was rounded once too)
        assert np.abs(c2 - (ca + cb) / 2).max() <= 1.0
        assert np.abs(c2 - ca).max() >= 3 and np.abs(c2 - cb).max() >= 3
        np.testing.assert_array_equal(decode_query(o2.layers["clean"], o2.layers["component"]), q)


def test_sefm_mask_is_where_clean_differs_by_more_than_change_threshold(tmp_path):
    from pseudolabel.models.incontext.component import clean_mask

    ck = perturbed_checkpoint(tmp_path / "ck", seed=1)
    demo_in, demo_out = _demo_pair(tmp_path)
    queries = _watermarked_queries()
    # the clean images do not depend on the threshold: pick thresholds inside the range of changes
    cleans = [o.layers["clean"] for o in _sefm(ck, demo_in, demo_out)(queries)]
    diffs = [np.abs(q.astype(int) - c.astype(int)).max(axis=2) for q, c in zip(queries, cleans)]
    low, high = (int(np.percentile(np.concatenate([d.ravel() for d in diffs]), pc)) for pc in (25, 75))
    assert low < high
    masks = {}
    for thr in (low, high):
        # without clean-up the mask is exactly the thresholded difference
        lab = _sefm(ck, demo_in, demo_out, change_threshold=thr, mask_open_radius=0, mask_close_radius=0, min_area=0)
        for i, out in enumerate(lab(queries)):
            np.testing.assert_array_equal(out.layers["clean"], cleans[i])
            expected = diffs[i] > thr
            assert 0 < expected.sum() < expected.size  # some pixels on each side of the threshold
            assert len(out.instances) == 1
            inst = out.instances[0]
            assert inst.category == "component" and inst.category_id == 1
            np.testing.assert_array_equal(inst.mask, expected)
            masks[thr, i] = inst.mask
    for i in range(len(queries)):  # a higher threshold keeps a subset
        assert masks[high, i].sum() < masks[low, i].sum() and not (masks[high, i] & ~masks[low, i]).any()
    # with the default clean-up: the cleaned thresholded difference
    lab = _sefm(ck, demo_in, demo_out, change_threshold=low)
    p = lab.params
    for d, out in zip(diffs, lab(queries)):
        expected = clean_mask(d > low, p.mask_open_radius, p.mask_close_radius, p.min_area)
        assert expected.any()
        np.testing.assert_array_equal(out.instances[0].mask, expected)


# ------------------------------------------------------------------------------------------------
# The two halves: forward (device) -> payload bytes -> postprocess on a weight-free host half
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,layout,arch", [("float32", "grid", "sefm-small"), ("float16", "grid", "sefm-small"),
                                               ("float32", "vertical", "sefm-small"), ("float32", "grid", "sefm")])
def test_sefm_split_is_exact(tmp_path, dtype, layout, arch):
    from halves import assert_same_outputs
    from test_incontext_seggpt import split_outputs

    from pseudolabel.models.base import Labeler

    ck = perturbed_checkpoint(tmp_path / "ck", seed=1, layout=layout, base=TINY if arch == "sefm-small" else REF_TINY)
    a_in, a_out = _demo_pair(tmp_path, seed=0)
    (tmp_path / "b").mkdir()
    b_in, b_out = _demo_pair(tmp_path / "b", seed=3)  # a second pair (another scene and watermark)
    queries = _watermarked_queries()
    lab = _sefm(ck, [a_in, b_in], [a_out, b_out], dtype=dtype, change_threshold=6)
    assert type(lab).label is Labeler.label and type(lab).splits() and type(lab).has_device_half()
    whole = lab(queries)
    split, payloads = split_outputs(lab, queries)
    assert_same_outputs(whole, split)
    assert all(len(o.instances) == 1 for o in whole)  # the network changed something, so the mask is tested
    for pl in payloads:
        # per pair, the answer cell and the query cell as the network saw it, in the network's dtype
        assert set(pl) == {"answer", "query_cell"}
        for arr in pl.values():
            assert arr.shape == (2, 32, 32, 3) and arr.dtype == np.dtype(dtype)
        assert not np.array_equal(pl["answer"], pl["query_cell"])
    # the payload holds the cells the host needs: the clean image follows from them alone
    q, pl = queries[0], payloads[0]
    expected = np.mean([cv.transfer_residual(q.astype(np.float32) / 255, c, a) for c, a in
                        zip(pl["query_cell"].astype(np.float32), pl["answer"].astype(np.float32))], axis=0)
    assert np.abs(split[0].layers["clean"].astype(float) - expected * 255).max() <= 0.5 + 1e-3


def test_sefm_host_half_loads_no_weights_and_reads_no_demonstration(tmp_path):
    from halves import assert_same_outputs
    from test_incontext_seggpt import split_outputs

    ck = perturbed_checkpoint(tmp_path / "ck", seed=1)
    demo_in, demo_out = _demo_pair(tmp_path)
    queries = _watermarked_queries()
    params = {"backend": "sefm", "change_threshold": 6}
    ontology = [{"category": "watermark", "id": 3}]
    lab = labeler_class("incontext")(LabelerSpec(name="incontext", weights=ck, ontology=ontology,
                                                 params={**params, "demo_in": demo_in, "demo_out": demo_out}))
    missing = tmp_path / "missing"
    spec = LabelerSpec(name="incontext", weights=str(missing / "ck"), ontology=ontology,
                       params={**params, "demo_in": str(missing / "in.png"), "demo_out": str(missing / "out.png")})
    with pytest.raises(FileNotFoundError):  # the full labeler needs the checkpoint and the pair
        labeler_class("incontext")(spec)
    host = labeler_class("incontext").host_half(spec)
    assert not any(hasattr(host, a) for a in ("net", "run_net", "pairs", "cell", "layout"))
    assert (host.category, host.category_id) == ("watermark", 3)
    whole = lab(queries)
    assert all(o.instances and o.instances[0].category == "watermark" for o in whole)
    assert_same_outputs(whole, split_outputs(lab, queries, host=host)[0])


# ------------------------------------------------------------------------------------------------
# The published architecture (arch "sefm"): layout, size, forward, checkpoints
# ------------------------------------------------------------------------------------------------

#: parameter counts of the published layout at width 32 (every parameter / those its forward uses)
SEFM_PARAMETERS = 204_791_715
SEFM_PARAMETERS_USED = 202_844_899


def test_sefm_is_the_default_architecture_with_the_published_layout():
    from pseudolabel.models.incontext.sefm import SeFMNet
    from pseudolabel.models.incontext.sefm_reference import TSA, CAttention, GAttention, SAttention, TBlock

    cfg = SeFMConfig()
    assert (cfg.arch, cfg.width, cfg.enc_blocks, cfg.middle_blocks, cfg.dec_blocks, cfg.heads, cfg.window,
            cfg.global_patch, cfg.cell) == ("sefm", 32, [2, 2, 4, 6], 6, [3, 2, 4, 6], [1, 2, 4, 4, 8], 16, 16, 256)
    with torch.device("meta"):  # the full-size network, without allocating it
        net = SeFM(cfg)
    assert isinstance(net, SeFMNet) and net.multiple == 256

    def stage(blocks):
        kinds = {(type(b), type(b.att), type(b.att.satt), type(b.att.catt), type(b.att.gatt)) for b in blocks}
        assert kinds == {(TBlock, TSA, SAttention, CAttention, GAttention)}
        b = blocks[0]
        assert b.att.window == 16 and b.att.satt.window == 16
        return (len(blocks), b.att.conv1_1.in_channels, b.att.satt.heads, b.att.gatt.shuffle,
                b.dp_ffn.linear[0].out_channels)

    # (depth, channels, heads, global patch, FFN hidden) per stage
    assert [stage(e) for e in net.encoders] == [(2, 32, 1, 16, 64), (2, 64, 2, 8, 128), (4, 128, 4, 4, 256),
                                                (6, 256, 4, 4, 512)]
    assert stage(net.middle) == (6, 512, 8, 2, 1024)
    assert [stage(d) for d in net.decoders] == [(3, 256, 4, 4, 512), (2, 128, 4, 4, 256), (4, 64, 2, 8, 128),
                                                (6, 32, 1, 16, 64)]
    # down: 3×3 conv to C/2 + pixel-unshuffle; up: 1×1 conv to 2C + pixel-shuffle; 3×3 intro / ending
    assert [(d[0].in_channels, d[0].out_channels, d[0].kernel_size, type(d[1]).__name__) for d in net.downs] == [
        (c, c // 2, (3, 3), "PixelUnshuffle") for c in (32, 64, 128, 256)]
    assert [(u[0].in_channels, u[0].out_channels, u[0].kernel_size, type(u[1]).__name__) for u in net.ups] == [
        (c, 2 * c, (1, 1), "PixelShuffle") for c in (512, 256, 128, 64)]
    channels = (net.intro.in_channels, net.intro.out_channels, net.ending.in_channels, net.ending.out_channels)
    assert channels == (3, 32, 32, 3)
    # its size: counted on the meta device
    params = dict(net.named_parameters())
    assert sum(p.numel() for p in params.values()) == SEFM_PARAMETERS
    unused = sum(p.numel() for k, p in params.items() if ".gatt.conv1_" in k or ".dp_ffn.norm." in k)
    assert SEFM_PARAMETERS - unused == SEFM_PARAMETERS_USED


def test_small_architecture_is_the_restormer_style_network():
    from pseudolabel.models.incontext.sefm import SeFMSmall, count_parameters

    with torch.device("meta"):
        net = SeFM(SeFMConfig(arch="sefm-small"))
    assert isinstance(net, SeFMSmall) and count_parameters(net) == 25_472_823
    assert (net.config.width, net.config.enc_blocks, net.config.dec_blocks, net.config.refine_blocks) == (
        48, [4, 6, 6, 8], [4, 6, 6], 4)
    with pytest.raises(ValueError, match="only for arch 'sefm'"):
        SeFMConfig(arch="sefm-small", window=8)
    with pytest.raises(ValueError, match="only for arch 'sefm-small'"):
        SeFMConfig(refine_blocks=2)
    with pytest.raises(ValueError, match="dec_blocks needs 4"):
        SeFMConfig(dec_blocks=[1, 1, 1])
    with pytest.raises(ValueError, match="heads needs 5"):
        SeFMConfig(heads=[1, 2, 4, 8])


def test_sefm_forward_is_ending_conv_plus_input_for_any_size():
    torch.manual_seed(0)
    net = SeFM(SeFMConfig(**REF_TINY)).eval()
    assert net.multiple == 64
    for hw in [(64, 64), (40, 56)]:
        x = torch.rand(2, 3, *hw)
        with torch.no_grad():
            y = net(x)
        assert y.shape == x.shape
        assert (y - x).abs().mean() > 1e-3  # default initialisation, as published: not the identity
    # the output is ending(features) + input: a zero ending conv returns the input exactly
    with torch.no_grad():
        net.ending.weight.zero_()
        net.ending.bias.zero_()
        torch.testing.assert_close(net(x), x, rtol=0, atol=0)


def test_sefm_attentions_are_windowed_channel_and_global():
    from pseudolabel.models.incontext.sefm_reference import GAttention, SAttention, to_windows

    torch.manual_seed(0)
    x = torch.rand(1, 8, 8, 8)
    bumped = x.clone()
    bumped[:, :, 0, 0] += 1.0
    with torch.no_grad():
        # spatial: 4×4 windows; a change in the top-left window stays in it
        satt = SAttention(8, 2, window=4)
        a, b = satt(to_windows(x, 4)), satt(to_windows(bumped, 4))
        changed = (a - b).abs().amax(dim=(1, 2)) > 0
        assert changed.tolist() == [True, False, False, False]
        # relative position bias: (2·4 − 1)² offsets, shared by equal offsets
        bias = satt.position_bias()
        assert bias.shape == (2, 16, 16) and satt.relative_position_bias_table.shape == (49, 2)
        torch.testing.assert_close(bias[:, 0, 1], bias[:, 5, 6])  # both one pixel to the right
        # global: patches of 16 // heads, attention over the whole map
        gatt = GAttention(8, 4, global_patch=16)
        assert gatt.shuffle == 4 and gatt.to_qkv.in_features == 8 * 16 and gatt.to_qkv.out_features == 3 * 64 * 4
        g = (gatt(x) - gatt(bumped)).abs().amax(dim=1)[0]
        assert (g[4:, 4:] > 0).all()  # the far patch sees the change


def test_checkpoints_record_the_architecture(tmp_path):
    from pseudolabel.models.incontext.sefm import SeFMNet, SeFMSmall

    torch.manual_seed(0)
    ref = SeFM(SeFMConfig(**REF_TINY))
    ref.save_pretrained(str(tmp_path / "ref"))
    assert json.load(open(tmp_path / "ref" / "config.json"))["arch"] == "sefm"
    loaded = SeFM.from_pretrained(str(tmp_path / "ref"))
    assert isinstance(loaded, SeFMNet) and loaded.config == ref.config
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref.eval()(x))
    assert isinstance(SeFMNet.from_pretrained(str(tmp_path / "ref")), SeFMNet)
    # a state dict of the layout, with its stored relative position indices, loads strictly
    from pseudolabel.models.incontext.sefm_reference import load_layout_state_dict, relative_position_index

    state = {**ref.state_dict(), "encoders.0.0.att.satt.relative_position_index": relative_position_index(4)}
    other = SeFM(SeFMConfig(**REF_TINY))
    load_layout_state_dict(other, state)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), ref(x))
    with pytest.raises(TypeError, match="'sefm' network"):
        SeFMSmall.from_pretrained(str(tmp_path / "ref"))


def test_small_checkpoint_without_arch_still_loads_as_sefm_small(tmp_path):
    """A checkpoint as written before there were two architectures: config.json without ``arch``."""
    from safetensors.torch import save_file

    from pseudolabel.models.incontext.sefm import SeFMSmall

    torch.manual_seed(3)
    net = SeFM(SeFMConfig(**TINY))
    with torch.no_grad():
        torch.nn.init.normal_(net.out.weight, std=0.05)
    old = tmp_path / "old"
    old.mkdir()
    legacy = {"model_type": "sefm", "in_channels": 3, "width": 8, "enc_blocks": [1, 1], "dec_blocks": [1],
              "refine_blocks": 0, "heads": [1, 2], "ffn_expansion": 2.0, "cell": 32, "layout": "grid"}
    (old / "config.json").write_text(json.dumps(legacy))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(old / "model.safetensors"),
              metadata={"format": "pt"})
    loaded = SeFM.from_pretrained(str(old))
    assert isinstance(loaded, SeFMSmall) and loaded.config.arch == "sefm-small" and loaded.config.width == 8
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x))


@pytest.mark.parametrize("drop_arch", [False, True])
def test_labeler_loads_either_architecture(tmp_path, drop_arch):
    base = TINY if drop_arch else REF_TINY
    ck = perturbed_checkpoint(tmp_path / "ck", seed=2, base=base)
    if drop_arch:  # an old sefm-small checkpoint
        cfg = json.load(open(tmp_path / "ck" / "config.json"))
        cfg = {k: v for k, v in cfg.items() if k in ("model_type", "in_channels", "width", "enc_blocks", "dec_blocks",
                                                      "refine_blocks", "heads", "ffn_expansion", "cell", "layout")}
        (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    demo_in, demo_out = _demo_pair(tmp_path)
    lab = _sefm(ck, demo_in, demo_out, change_threshold=6)
    assert lab.net.config.arch == ("sefm-small" if drop_arch else "sefm") and lab.cell == 32
    queries = _watermarked_queries()
    for q, out in zip(queries, lab(queries)):
        clean, comp = out.layers["clean"], out.layers["component"]
        assert clean.shape == q.shape and not np.array_equal(clean, q)
        np.testing.assert_array_equal(decode_query(clean, comp), q)


# ------------------------------------------------------------------------------------------------
# The loss: L1 + 0.3 · BCE of a 20-way component-type discriminator
# ------------------------------------------------------------------------------------------------

def test_loss_by_hand():
    from pseudolabel.models.incontext.sefm_loss import discriminator_loss, sefm_loss

    output = torch.zeros(1, 3, 2, 2)
    target = torch.full((1, 3, 2, 2), 0.25)
    target[0, 1, 1, 0] = 1.0
    l1 = (11 * 0.25 + 1.0) / 12  # mean |output − target| over 12 values
    p_out = torch.full((1, 20), 0.1)
    p_out[0, 3] = 0.8
    p_tgt = torch.full((1, 20), 0.05)
    p_tgt[0, 7] = 0.5
    types = torch.zeros(1, 20)
    types[0, 3] = 1.0
    # the network: L1 + 0.3 · mean over the 20 types of −log(1 − p), the target being "no component"
    adv = -(19 * math.log(0.9) + math.log(0.2)) / 20
    total, parts = sefm_loss(output, target, p_out)
    assert math.isclose(float(parts["l1"]), l1, rel_tol=1e-6) and math.isclose(float(parts["adv"]), adv, rel_tol=1e-6)
    assert math.isclose(float(total), l1 + 0.3 * adv, rel_tol=1e-6)
    assert math.isclose(float(total), 0.31250 + 0.3 * 0.180564, rel_tol=1e-5)  # the same, in figures
    # the discriminator: target -> no type; output -> the removed type (slot 3)
    d_tgt = -(19 * math.log(0.95) + math.log(0.5)) / 20
    d_out = -(math.log(0.8) + 19 * math.log(0.9)) / 20

    def stub(x):  # the clean target has mean 0.3125, the output 0
        return p_tgt if float(x.mean()) > 0.1 else p_out

    assert math.isclose(float(discriminator_loss(stub, output, target, types)), d_tgt + d_out, rel_tol=1e-6)
    # plain L1 without a discriminator; the component weight scales the masked pixels' L1
    assert math.isclose(float(sefm_loss(output, target)[0]), l1, rel_tol=1e-6)
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 1, 0] = 1.0
    weighted = (9 * 0.25 + 2 * 0.25 * 3 + 1.0 * 3) / 12  # pixel (1, 0) weighted 1 + 2 in its 3 channels
    assert math.isclose(float(sefm_loss(output, target, mask=mask, component_weight=2.0)[0]), weighted, rel_tol=1e-6)


def test_component_discriminator_layout():
    from pseudolabel.models.incontext.sefm_loss import ComponentDiscriminator

    torch.manual_seed(0)
    disc = ComponentDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (3, 32, 4, 1), (32, 32, 4, 2), (32, 64, 4, 2), (64, 128, 4, 2), (128, 256, 4, 2), (256, 256, 4, 2),
        (256, 512, 4, 2), (512, 512, 4, 4), (512, 20, 1, 1)]
    assert all(c.bias is None for c in convs)
    assert sum(p.numel() for p in disc.parameters()) == 8_056_320
    # a 256×256 cell reaches the last layer as one position: one probability per type
    seen = {}
    disc.layer7[2].register_forward_hook(lambda m, i, o: seen.update(map=o.shape))
    with torch.no_grad():
        p = disc(torch.rand(2, 3, 256, 256))
        assert seen["map"] == (2, 20, 1, 1)
        small = disc(torch.rand(2, 3, 32, 32))
    assert p.shape == small.shape == (2, 20)
    assert ((p > 0) & (p < 1)).all() and ((small > 0) & (small < 1)).all()
