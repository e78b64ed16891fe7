"""The ``incontext`` labeler's public-weights path: SegGPT (tiny random config) + OpenCV inpainting."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from halves import assert_same_outputs

from pseudolabel.models.incontext.component import decode_query, dilate
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.spec import LabelerSpec


def save_tiny_seggpt(directory: str) -> str:
    """A random-weight SegGptForImageSegmentation of the real architecture (32×32 halves) + its processor."""
    from transformers import SegGptConfig, SegGptForImageSegmentation, SegGptImageProcessor

    cfg = SegGptConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=[64, 32],
                       patch_size=8, pretrain_image_size=32, decoder_hidden_size=8, merge_index=0,
                       intermediate_hidden_state_indices=[0, 1])
    torch.manual_seed(0)
    SegGptForImageSegmentation(cfg).save_pretrained(directory)
    SegGptImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def _png(path, rgb) -> str:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return str(path)


def watermark_pair(tmp_path, size=64, seed=11) -> tuple[str, str]:
    """A demonstration pair (watermarked scene, the same scene clean) written as PNGs."""
    from pseudolabel.jobs.demo.data import add_watermark, render_scene

    rng = np.random.default_rng(seed)
    clean = render_scene(rng, size, shadow_prob=0.0, watermark_prob=0.0).clean
    marked, _ = add_watermark(clean, rng, text="SAMPLE", opacity=0.6)
    return _png(tmp_path / "demo_in.png", marked), _png(tmp_path / "demo_out.png", clean)


def calibrated_threshold(model_dir, demo_in, demo_out, images) -> float:
    """The random SegGPT is uncalibrated: a threshold at the 80th percentile of its probabilities."""
    from pseudolabel.models.incontext.component import difference_mask
    from pseudolabel.models.incontext.labeler import decode_image
    from pseudolabel.models.incontext.seggpt_inpaint import SegGptFinder

    a = decode_image(open(demo_in, "rb").read())
    b = decode_image(open(demo_out, "rb").read())
    probs = SegGptFinder(model_dir).foreground(images, a, difference_mask(a, b))
    return float(np.percentile(np.concatenate([p.ravel() for p in probs]), 80))


def _queries(n=2, size=64, seed=5):
    from pseudolabel.jobs.demo.data import render_scene

    rng = np.random.default_rng(seed)
    return [render_scene(rng, size, shadow_prob=0.0, watermark_prob=1.0).image for _ in range(n)]


def test_finder_outputs_probabilities_at_query_size(tmp_path):
    from pseudolabel.models.incontext.seggpt_inpaint import SegGptFinder

    model_dir = save_tiny_seggpt(str(tmp_path / "seggpt"))
    finder = SegGptFinder(model_dir)
    rng = np.random.default_rng(0)
    queries = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (64, 30, 3), dtype=np.uint8)]
    mask = np.zeros((48, 48), bool)
    mask[10:30, 5:40] = True
    probs = finder.foreground(queries, rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), mask)
    assert [p.shape for p in probs] == [(40, 50), (64, 30)]
    assert all(p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1 for p in probs)
    # the prompt matters: another demo mask gives another answer
    other = finder.foreground(queries, rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), ~mask)
    assert not np.allclose(probs[0], other[0])


def test_labeler_from_local_dir_separates_and_is_lossless(tmp_path):
    model_dir = save_tiny_seggpt(str(tmp_path / "seggpt"))
    demo_in, demo_out = watermark_pair(tmp_path)
    images = _queries()
    thr = calibrated_threshold(model_dir, demo_in, demo_out, images)
    spec = LabelerSpec(name="incontext", weights=model_dir,
                       params={"backend": "seggpt+inpaint", "demo_in": demo_in, "demo_out": demo_out,
                               "fg_threshold": thr, "min_area": 4},
                       ontology=[{"category": "watermark"}])
    lab = labeler_class("incontext")(spec)
    assert lab.demo_masks[0].any()
    outs = lab(images)
    assert len(outs) == len(images)
    for im, out in zip(images, outs):
        clean, comp = out.layers["clean"], out.layers["component"]
        assert clean.shape == im.shape and clean.dtype == np.uint8 and comp.dtype == np.uint8
        np.testing.assert_array_equal(decode_query(clean, comp), im)  # component + clean == query
        assert len(out.instances) == 1
        inst = out.instances[0]
        assert inst.category == "watermark" and inst.category_id == 1 and inst.mask.shape == im.shape[:2]
        assert 0 < inst.score <= 1
        # inpainting changes pixels only inside the (dilated) mask, and does change them
        region = dilate(inst.mask, lab.params.inpaint_dilate)
        np.testing.assert_array_equal(clean[~region], im[~region])
        assert not np.array_equal(clean[region], im[region])


def test_identical_demo_pair_is_rejected(tmp_path):
    model_dir = save_tiny_seggpt(str(tmp_path / "seggpt"))
    demo_in, _ = watermark_pair(tmp_path)
    with pytest.raises(ValueError, match="do not differ"):
        labeler_class("incontext")(LabelerSpec(name="incontext", weights=model_dir,
                                               params={"demo_in": demo_in, "demo_out": demo_in}))
    with pytest.raises(ValueError):
        labeler_class("incontext").Params.model_validate({"demo_in": [demo_in], "demo_out": []})


def test_weights_and_demo_pair_from_s3(tmp_path, s3_bucket, monkeypatch):
    from pseudolabel import storage as st

    bucket, storage = s3_bucket
    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_seggpt(str(tmp_path / "seggpt"))
    import os

    for name in os.listdir(model_dir):
        st.write_bytes(f"{bucket}/seggpt/{name}", open(os.path.join(model_dir, name), "rb").read(), storage)
    demo_in, demo_out = watermark_pair(tmp_path)
    st.write_bytes(f"{bucket}/demo/in.png", open(demo_in, "rb").read(), storage)
    st.write_bytes(f"{bucket}/demo/out.png", open(demo_out, "rb").read(), storage)
    spec = LabelerSpec(name="incontext", weights=f"{bucket}/seggpt",
                       params={"demo_in": [f"{bucket}/demo/in.png", demo_in],
                               "demo_out": [f"{bucket}/demo/out.png", demo_out], "fg_threshold": 0.0})
    lab = labeler_class("incontext")(spec, storage=storage)
    assert len(lab.pairs) == 2
    im = _queries(1)[0]
    out = lab([im])[0]
    np.testing.assert_array_equal(decode_query(out.layers["clean"], out.layers["component"]), im)


# ------------------------------------------------------------------------------------------------
# The two halves: forward (device) -> payload bytes -> postprocess on a weight-free host half
# ------------------------------------------------------------------------------------------------

def split_outputs(lab, images, host=None):
    """``lab``'s outputs computed as the engine does: ``forward``, each payload through bytes, then
    ``postprocess`` on ``host`` (default: a ``host_half`` of ``lab``'s spec). Returns (outputs, payloads)."""
    from pseudolabel.engine.payload import pack_payload, unpack_payload

    payloads = lab.forward(images, [None] * len(images))
    assert len(payloads) == len(images)
    for pl in payloads:  # plain NumPy arrays only (np.save without pickle)
        assert isinstance(pl, dict) and all(type(v) is np.ndarray for v in pl.values()), pl
    shipped = [unpack_payload(pack_payload(pl)) for pl in payloads]
    host = host or type(lab).host_half(lab.spec, lab.storage)
    return [host.postprocess(im, None, pl) for im, pl in zip(images, shipped)], payloads


def test_split_is_exact_and_payloads_are_compact(tmp_path):
    model_dir = save_tiny_seggpt(str(tmp_path / "seggpt"))
    demo_in, demo_out = watermark_pair(tmp_path)
    rng = np.random.default_rng(0)
    images = _queries(2) + [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)]
    thr = calibrated_threshold(model_dir, demo_in, demo_out, images)
    spec = LabelerSpec(name="incontext", weights=model_dir,
                       params={"backend": "seggpt+inpaint", "demo_in": [demo_in, demo_in],
                               "demo_out": [demo_out, demo_out], "fg_threshold": thr, "min_area": 4},
                       ontology=[{"category": "watermark", "id": 5}])
    cls = labeler_class("incontext")
    from pseudolabel.models.base import Labeler

    assert cls.splits() and cls.has_device_half() and cls.label is Labeler.label  # label = the two halves
    lab = cls(spec)
    whole = lab(images)
    split, payloads = split_outputs(lab, images)
    assert_same_outputs(whole, split)
    found = 0
    for im, out, pl in zip(images, whole, payloads):
        h, w = im.shape[:2]
        # OpenCV inpainting is host work: no clean image in the payload, just the packed mask and score
        assert set(pl) == {"mask", "score"}
        assert pl["mask"].dtype == np.uint8 and pl["mask"].shape == (h, (w + 7) // 8)
        assert pl["score"].shape == () and pl["score"].dtype == np.float64
        if out.instances:
            found += 1
            inst = out.instances[0]
            assert (inst.category, inst.category_id) == ("watermark", 5) and inst.score == float(pl["score"]) > 0
            np.testing.assert_array_equal(np.unpackbits(pl["mask"], axis=1, count=w).astype(bool), inst.mask)
            assert not np.array_equal(out.layers["clean"], im)
    assert found >= 2
    # an image where nothing is found: an empty mask, score 0, the query back
    strict = cls(spec.model_copy(update={"params": {**spec.params, "fg_threshold": 1.0}}))
    out, payloads = split_outputs(strict, images[:1])
    assert not np.unpackbits(payloads[0]["mask"]).any() and float(payloads[0]["score"]) == 0.0
    assert out[0].instances == [] and np.array_equal(out[0].layers["clean"], images[0])
    assert_same_outputs(strict(images[:1]), out)


def test_host_half_loads_no_weights_and_reads_no_demonstration(tmp_path):
    model_dir = save_tiny_seggpt(str(tmp_path / "seggpt"))
    demo_in, demo_out = watermark_pair(tmp_path)
    images = _queries(2)
    thr = calibrated_threshold(model_dir, demo_in, demo_out, images)
    params = {"backend": "seggpt+inpaint", "fg_threshold": thr, "min_area": 4}
    lab = labeler_class("incontext")(LabelerSpec(name="incontext", weights=model_dir,
                                                 params={**params, "demo_in": demo_in, "demo_out": demo_out}))
    # neither the weights nor the demonstration images exist for the host half
    missing = str(tmp_path / "missing")
    host = labeler_class("incontext").host_half(LabelerSpec(
        name="incontext", weights=f"{missing}/seggpt",
        params={**params, "demo_in": f"{missing}/in.png", "demo_out": f"{missing}/out.png"}))
    assert not any(hasattr(host, a) for a in ("finder", "pairs", "demo_masks", "inpainter"))
    assert (host.category, host.category_id) == ("component", 1)
    with pytest.raises(FileNotFoundError):  # the full labeler does need them
        labeler_class("incontext")(host.spec)
    split, _ = split_outputs(lab, images, host=host)
    whole = lab(images)
    assert sum(len(o.instances) for o in whole) >= 1
    assert_same_outputs(whole, split)
