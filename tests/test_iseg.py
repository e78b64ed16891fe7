"""iSeg: the map algebra on constructed attention, token arithmetic, and the labeler on a tiny SD."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from halves import assert_same_output

from pseudolabel.models.iseg import (
    ISeg,
    combine_seed_columns,
    entropy_reduce,
    fuse_cross_attention,
    grid_to_image,
    kl_kmeans_smooth,
    labels_from_maps,
    normalize_columns,
    plan_prompts,
    refine,
    seed_matrix,
    seeds_from_prompts,
    select_tokens,
    symmetric_kl,
)
from pseudolabel.schemas.spec import LabelerSpec


def _random_attention(n: int, seed: int = 0, zero_frac: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=g) ** 4
    a[torch.rand(n, n, generator=g) < zero_frac] = 0
    a.fill_diagonal_(1.0)
    return a / a.sum(-1, keepdim=True)


def _two_blocks(h: int = 8, w: int = 8, split: int = 3) -> tuple[torch.Tensor, np.ndarray]:
    """Self-attention where columns < split attend uniformly among themselves, the rest likewise."""
    block = np.zeros((h, w), bool)
    block[:, :split] = True
    flat = block.flatten()
    a = (flat[:, None] == flat[None, :]).astype(np.float32)
    a /= a.sum(-1, keepdims=True)
    return torch.from_numpy(a), block


# ------------------------------------------------------------------------------- map algebra

def test_entropy_step_nonnegative_rows_sum_to_one_zeros_stay_zero():
    a = _random_attention(64)
    for lam in (0.015, 0.1, 0.2):
        r = entropy_reduce(a, lam)
        assert (r >= 0).all()
        assert torch.allclose(r.sum(-1), torch.ones(64), atol=1e-5)
        assert (r[a == 0] == 0).all()
    # the step removes small entries: a column-normalised value v with v + lam*log10(e*v) < 0 vanishes
    colnorm = a / a.amax(0, keepdim=True)
    small = (colnorm > 0) & (colnorm + 0.2 * torch.log10(math.e * colnorm.clamp_min(1e-30)) < 0)
    assert small.any()
    assert (entropy_reduce(a, 0.2)[small] == 0).all()
    # a row whose entries are all small next to their columns' maxima is emptied by the clamp: it falls
    # back to its column-normalised values instead of dividing by zero
    peaky = torch.eye(10) * 0.95 + 0.005
    peaky[9] = 0.1
    peaky[0, 9] = 0.9
    out = entropy_reduce(peaky, 0.5)
    assert torch.isfinite(out).all() and torch.allclose(out.sum(-1), torch.ones(10), atol=1e-5)
    colnorm = peaky[9] / peaky.amax(0)
    assert torch.allclose(out[9], colnorm / colnorm.sum(), atol=1e-6)
    scaled = a / a.amax(0, keepdim=True)
    assert torch.equal(entropy_reduce(a, 0.0), scaled / scaled.sum(-1, keepdim=True))
    # batched input gives the same per item
    batch = torch.stack([a, _random_attention(64, seed=1)])
    assert torch.allclose(entropy_reduce(batch, 0.1)[0], entropy_reduce(a, 0.1))


def test_identity_self_attention_is_a_fixed_point():
    eye = entropy_reduce(torch.eye(50), 0.1)
    assert torch.equal(eye, torch.eye(50))
    maps = normalize_columns(torch.rand(50, 3, generator=torch.Generator().manual_seed(0)))
    for n in (1, 5, 10):
        assert torch.allclose(refine(maps, eye, n), maps, atol=1e-6)


def test_normalize_columns():
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    y = normalize_columns(x)
    assert torch.allclose(y[:, 0], torch.tensor([0.0, 2 / 6, 4 / 6]))
    assert torch.allclose(y[:, 1], torch.full((3,), 1 / 3))  # constant column -> uniform


def test_point_seed_spreads_to_exactly_its_block():
    a, block = _two_blocks()
    affinity = entropy_reduce(a, 0.1)
    for point, expected in (([1, 5], block), ([6, 2], ~block)):  # (x, y) in the grid == image here
        seeds = seeds_from_prompts({"points_xy": [point]}, (8, 8), (8, 8))
        mat, owner = seed_matrix(seeds, 64)
        maps = grid_to_image(combine_seed_columns(refine(mat, affinity, 10), owner), (8, 8), (8, 8))
        labels = labels_from_maps(maps, "threshold", 0.4).numpy()
        assert np.array_equal(labels == 1, expected)


def test_box_and_line_seeds():
    a, block = _two_blocks()
    affinity = entropy_reduce(a, 0.1)
    # a point in the left block, a box inside the right block, image 4x the grid
    prompts = {"points_xy": [[4, 20]], "boxes_xyxy": [[20, 4, 31, 12]]}
    seeds = seeds_from_prompts(prompts, (32, 32), (8, 8))
    assert [s.kind for s in seeds] == ["point", "box"]
    assert seeds[0].cells == [5 * 8 + 1]
    # the reference floors both box ends: x 20..31 px -> cells 5, 6 (31 * 8 / 32 = 7.75 -> 7, exclusive)
    assert sorted(seeds[1].cells) == sorted(y * 8 + x for y in range(1, 3) for x in range(5, 7))
    mat, owner = seed_matrix(seeds, 64)
    maps = grid_to_image(combine_seed_columns(refine(mat, affinity, 10), owner), (8, 8), (8, 8))
    labels = labels_from_maps(maps, "threshold", 0.4).numpy()
    assert np.array_equal(labels == 1, block) and np.array_equal(labels == 2, ~block)

    # a line inside the right block: one column per cell, averaged after refinement
    seeds = seeds_from_prompts({"lines_xy": [[[16, 0], [16, 28], [28, 28]]]}, (32, 32), (8, 8))
    assert seeds[0].kind == "line"
    cells = set(seeds[0].cells)
    assert {0 * 8 + 4, 7 * 8 + 4, 7 * 8 + 7} <= cells and all(c % 8 >= 4 for c in cells)
    mat, owner = seed_matrix(seeds, 64)
    assert mat.shape == (64, len(cells)) and owner == [list(range(len(cells)))]
    maps = grid_to_image(combine_seed_columns(refine(mat, affinity, 10), owner), (8, 8), (8, 8))
    assert np.array_equal(labels_from_maps(maps, "threshold", 0.4).numpy() == 1, ~block)

    # a tiny box still covers a cell
    assert len(seeds_from_prompts({"boxes_xyxy": [[10, 10, 10.5, 10.5]]}, (32, 32), (8, 8))[0].cells) == 1


def test_labels_both_background_rules():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, :] = 1.0
    maps[1, 1, :] = 0.6
    maps[1, 2, :] = 0.3
    thr = labels_from_maps(maps, "threshold", 0.45)
    assert thr[0].tolist() == [1] * 4 and thr[1].tolist() == [2] * 4
    assert thr[2].tolist() == [0] * 4 and thr[3].tolist() == [0] * 4
    power = labels_from_maps(maps, "power")
    # (1-0.6)^2 = 0.16 < 0.6 -> class; (1-0.3)^2 = 0.49 > 0.3 -> background; empty -> background
    assert power[1].tolist() == [2] * 4 and power[2].tolist() == [0] * 4 and power[3].tolist() == [0] * 4


def test_fuse_cross_attention_weights_and_upsampling():
    g = torch.Generator().manual_seed(0)
    p16 = torch.rand(1, 16, 5, generator=g).softmax(-1)  # 4x4 grid
    p4 = torch.rand(1, 4, 5, generator=g).softmax(-1)  # 2x2 grid
    only = fuse_cross_attention({1: p16}, {1: (4, 4)}, {1: 1.0}, (4, 4))
    assert torch.allclose(only.sum(1), torch.ones(1, 5), atol=1e-6)  # each token map has unit mass
    assert torch.allclose(only[0, :, 2], p16[0, :, 2] / p16[0, :, 2].sum())
    both = fuse_cross_attention({1: p16, 2: p4}, {1: (4, 4), 2: (2, 2)}, {1: 0.3, 2: 0.7}, (4, 4))
    up = fuse_cross_attention({2: p4}, {2: (2, 2)}, {2: 1.0}, (4, 4))
    assert torch.allclose(both, 0.3 * only + 0.7 * up, atol=1e-6)
    with pytest.raises(ValueError):
        fuse_cross_attention({1: p16}, {1: (4, 4)}, {2: 1.0}, (4, 4))
    sel = select_tokens(only[0], [[1, 2], [4]])
    assert torch.allclose(sel[:, 0], only[0, :, 1:3].mean(-1)) and torch.allclose(sel[:, 1], only[0, :, 4])


def test_symmetric_kl_matches_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 7, generator=g), torch.rand(9, 7, generator=g)
    pa, pb = a[:, None] + 1e-5, b[None] + 1e-5
    direct = 0.5 * (pa * (pa.log() - pb.log())).sum(-1) + 0.5 * (pb * (pb.log() - pa.log())).sum(-1)
    assert torch.allclose(symmetric_kl(a, b), direct, atol=1e-5)
    assert torch.allclose(symmetric_kl(a, a).diagonal(), torch.zeros(5), atol=1e-5)
    assert torch.allclose(symmetric_kl(a, b), symmetric_kl(b, a).T, atol=1e-5)


def test_kl_kmeans_smoothing_constant_per_region():
    g = torch.Generator().manual_seed(0)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:6, 1:5] = True
    a, b = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.1, 0.8])
    maps = torch.where(region.flatten()[:, None], a, b) + 0.01 * torch.rand(64, 3, generator=g)
    # the reference's start grid: 9 clusters on 8x8 start every floor(8 / 3) = 2 rows/columns: 16 centres
    for precision, atol in (("float16", 1e-3), ("float32", 1e-6)):
        out = kl_kmeans_smooth(maps, (8, 8), clusters=9, iters=10, precision=precision)
        values, members = torch.unique(out, dim=0, return_inverse=True)
        assert 2 <= len(values) <= 16
        flat = region.flatten()
        for k in range(len(values)):
            cluster = members == k
            assert flat[cluster].all() or not flat[cluster].any()  # no cluster straddles the two regions
            assert torch.allclose(values[k], maps[cluster].mean(0), atol=atol)  # pixels carry their cluster's mean
        # smoothing reduces the spread inside the region
        assert out[flat].std(0).sum() < maps[flat].std(0).sum()


# ------------------------------------------------------------------------------- text

@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny random checkpoint with SD 2.1's layer names and head counts (the reference's layers and
    heads exist in it)."""
    from iseg_tiny import build_sd21_tiny

    return build_sd21_tiny(str(tmp_path_factory.mktemp("iseg_sd") / "sd"))


@pytest.fixture(scope="module")
def tokenizer(sd_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer")


def test_token_index_arithmetic_multi_token_names(tokenizer):
    phrases = [["cat"], ["zebra"], ["striped horse", "okapi"], ["dog"]]
    (plan,) = plan_prompts(tokenizer, phrases, ["grass", "sky", "dog"], drop_class_words=True)
    assert plan.text.startswith("a photograph of cat and zebra and striped horse and okapi and dog and other object")
    assert "dog" not in plan.text.split("background,")[1]  # with drop_class_words a class is not a background word
    (kept,) = plan_prompts(tokenizer, phrases, ["grass", "sky", "dog"], end=",")
    assert kept.text.endswith("background, grass, sky, dog,")  # the reference keeps it, and ends in ','
    assert kept.token_ids == plan.token_ids
    ids = tokenizer(plan.text, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(tokenizer("zebra", add_special_tokens=False).input_ids) > 1  # multi-token in this vocab
    for k, group in enumerate(phrases):
        expected = sum((tokenizer(p, add_special_tokens=False).input_ids for p in group), [])
        assert [ids[i] for i in plan.token_ids[k]] == expected
    assert plan.token_ids[0] == [4]  # start token + "a photograph of" (single tokens here)


def test_prompts_split_when_classes_overflow(tokenizer):
    phrases = [[f"zebra{chr(97 + i)}"] for i in range(12)]  # ~7 tokens each
    plans = plan_prompts(tokenizer, phrases, ["grass"], max_length=40)
    assert len(plans) > 1
    assert sorted(k for pl in plans for k in pl.classes) == list(range(12))
    for pl in plans:
        ids = tokenizer(pl.text, padding="max_length", max_length=40, truncation=True).input_ids
        for k, pos in zip(pl.classes, pl.token_ids):
            assert max(pos) < 39
            assert [ids[i] for i in pos] == tokenizer(phrases[k][0], add_special_tokens=False).input_ids
    with pytest.raises(ValueError):
        plan_prompts(tokenizer, [["zebra " * 20]], [], max_length=40)


# ------------------------------------------------------------------------------- labeler

ONTOLOGY = [{"category": "cat"}, {"category": "zebra", "prompts": ["zebra", "striped horse"]}, {"category": "sky"}]


def _images():
    rng = np.random.default_rng(0)
    img1 = np.zeros((72, 96, 3), np.uint8)
    img1[:, :48] = (200, 40, 40)
    img1[:, 48:] = (30, 60, 200)
    img1 = np.clip(img1 + rng.integers(0, 30, img1.shape), 0, 255).astype(np.uint8)
    img2 = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return [img1, img2]


def _spec(weights, **params):
    base = {"resolution": 64, "semantic_layer": True, "iterations": 5}
    base.update(params)
    return LabelerSpec(name="iseg", weights=weights, params=base, ontology=ONTOLOGY, dtype="float32")


def _check_output(out, image, allowed_ids):
    h, w = image.shape[:2]
    sem = out.layers["semantic"]
    assert sem.shape == (h, w) and sem.dtype == np.uint8
    union = np.zeros((h, w), bool)
    for inst in out.instances:
        assert inst.mask.shape == (h, w) and inst.mask.dtype == bool and inst.mask.any()
        assert (inst.category_id, inst.category) in allowed_ids
        assert 0.0 <= inst.score <= 1.0
        assert not (union & inst.mask).any()  # argmax labels never overlap
        union |= inst.mask
        assert (sem[inst.mask] == inst.category_id).all()
    assert (sem[~union] == 0).all()


def test_labeler_text_and_seeds_end_to_end(sd_dir):
    from pseudolabel.models.registry import labeler_class

    assert labeler_class("iseg") is ISeg
    lab = ISeg(_spec(sd_dir, clip_box_seeds=True))
    ids = {(1, "cat"), (2, "zebra"), (3, "sky")}
    images = _images()
    prompts = [None, {"points_xy": [[5, 5]], "boxes_xyxy": [[30, 30, 60, 62]], "categories": ["zebra", 3]}]
    outs = lab(images, prompts)
    assert len(outs) == 2
    _check_output(outs[0], images[0], ids)
    assert outs[0].instances, "text mode produced no mask"
    _check_output(outs[1], images[1], ids)
    seeded = {i.prompt: i for i in outs[1].instances}
    assert set(seeded) <= {"point", "box"} and "box" in seeded
    assert seeded["box"].category == "sky"
    ys, xs = np.nonzero(seeded["box"].mask)
    assert xs.min() >= 30 and ys.min() >= 30 and xs.max() < 60 and ys.max() < 62  # clipped to its box
    if "point" in seeded:
        assert seeded["point"].category == "zebra"

    # deterministic for a fixed seed; the row's categories restrict the classes (image-level tags)
    again = lab(images[:1], [None])[0]
    assert ([(i.category, i.mask.sum()) for i in again.instances]
            == [(i.category, i.mask.sum()) for i in outs[0].instances])
    tagged = lab(images[:1], [{"categories": ["sky"]}])[0]
    assert {i.category for i in tagged.instances} <= {"sky"} and tagged.instances
    with pytest.raises(ValueError):
        lab(images[1:], [{"points_xy": [[1, 1]], "categories": ["unicorn"]}])


def test_labeler_power_rule_and_from_s3(sd_dir, s3_bucket, tmp_path, monkeypatch):
    from pseudolabel.storage import filesystem

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    bucket, storage = s3_bucket
    fs, root = filesystem(f"{bucket}/sd21", storage)
    fs.put(sd_dir, root, recursive=True)
    images = _images()[:1]
    local = ISeg(_spec(sd_dir, background="power", kmeans=False))(images)[0]
    remote = ISeg(_spec(f"{bucket}/sd21", background="power", kmeans=False), storage=storage)(images)[0]
    _check_output(remote, images[0], {(1, "cat"), (2, "zebra"), (3, "sky")})
    assert [(i.category, i.mask.sum(), round(i.score, 5)) for i in remote.instances] == \
        [(i.category, i.mask.sum(), round(i.score, 5)) for i in local.instances]
    # the (1 - max)^2 rule labels every pixel where some class map dominates; at least one class wins
    assert remote.instances


def test_run_through_ray_on_demo_data(sd_dir, ray_cluster, tmp_path):
    from pycocotools.coco import COCO

    import pseudolabel
    from pseudolabel.imageio import decode_png
    from pseudolabel.jobs.demo.data import CATEGORIES, generate
    from pseudolabel.jobs.outputs.export import export
    from pseudolabel.jobs.outputs.labels_io import read_labels

    data = tmp_path / "demo"
    generate(str(data), images=3, shards=1, size=64, progress=False)
    ontology = [{"category": c["name"], "id": c["id"]} for c in CATEGORIES]
    job = {
        "name": "iseg-demo",
        "input": {"uri": str(data / "images"), "format": "coco",
                  "coco_json": str(data / "annotations" / "instances.json")},
        "output": {"uri": str(tmp_path / "out")},
        "labelers": [{"name": "iseg", "weights": sd_dir, "dtype": "float32", "ontology": ontology,
                      "params": {"resolution": 64, "iterations": 5, "semantic_layer": True}}],
        "resources": {"actors": 1, "batch_size": 2},
    }
    summary = pseudolabel.run(job, progress=False)
    assert summary, "empty summary"
    table = read_labels(str(tmp_path / "out")).to_pylist()
    assert len(table) == 3 and all(r["status"] == "ok" for r in table)
    gt = json.loads((data / "annotations" / "instances.json").read_text())
    n_boxes = {img["file_name"]: sum(a["image_id"] == img["id"] for a in gt["annotations"]) for img in gt["images"]}
    for row in table:
        assert row["annotations"], "no masks from the box seeds"
        assert all(a["prompt"] == "box" and a["labeler"] == "iseg" for a in row["annotations"])
        assert len(row["annotations"]) <= n_boxes[row["file_name"]]
        sem = [layer for layer in row["layers"] if layer["name"] == "semantic"]
        assert len(sem) == 1 and decode_png(sem[0]["png"]).shape == (row["height"], row["width"])

    out_json = tmp_path / "coco.json"
    export(str(tmp_path / "out"), "coco", str(out_json))
    coco = COCO(str(out_json))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) == sum(len(r["annotations"]) for r in table)
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert coco.annToMask(ann).sum() == ann["area"]
    res = tmp_path / "results.json"
    export(str(tmp_path / "out"), "coco-results", str(res), gt_json=str(out_json))
    assert len(coco.loadRes(str(res)).getAnnIds()) == len(coco.getAnnIds())


# ------------------------------------------------------------------------------- audit checks

@pytest.fixture(scope="module")
def lab(sd_dir):
    return ISeg(_spec(sd_dir))


def _batch_mates():
    rng = np.random.default_rng(11)
    a = rng.integers(0, 256, (80, 56, 3), dtype=np.uint8)
    b = np.full((64, 64, 3), 120, np.uint8)
    b[16:48, 8:40] = (30, 200, 90)
    return [a, b]


def _same_labels(a, b):
    """Identical masks, categories and semantic layer; scores equal up to batch arithmetic (float32 in the
    pass, then the k-means' float16 rounding, as in the reference, which one float32 ulp can flip)."""
    assert [(i.category, i.prompt) for i in a.instances] == [(i.category, i.prompt) for i in b.instances]
    for x, y in zip(a.instances, b.instances):
        assert np.array_equal(x.mask, y.mask)
        assert x.score == pytest.approx(y.score, abs=1e-4)
    assert np.array_equal(a.layers["semantic"], b.layers["semantic"])


def test_labels_do_not_depend_on_the_batch_or_position(lab):
    """The engine retries a failed batch one image at a time: an image labelled alone must get exactly
    the masks it got at position 2 of a batch of 3 (the noise is per row, not one draw for the batch)."""
    target = _images()[0]
    mates = _batch_mates()
    for prompt in (None, {"points_xy": [[10, 30]], "boxes_xyxy": [[50, 5, 90, 60]]}):
        alone = lab([target], [prompt])[0]
        batched = lab(mates + [target], [None, {"categories": ["sky"]}, prompt])[2]
        assert alone.instances
        _same_labels(batched, alone)


def test_class_token_embeddings_are_scaled_before_the_pass(lab, monkeypatch):
    from pseudolabel.models import attention

    real = attention.noisy_unet_pass
    seen = []

    def spy(unet, scheduler, latents, timestep, text_embeddings, *args, **kwargs):
        seen.append(text_embeddings.clone())
        return real(unet, scheduler, latents, timestep, text_embeddings, *args, **kwargs)

    monkeypatch.setattr(attention, "noisy_unet_pass", spy)
    lab(_images(), [None, {"categories": ["zebra"]}])
    assert len(seen) == 1 and lab.params.text_scale == pytest.approx(1.6)
    (emb,) = seen
    tok, te = lab.sd.tokenizer, lab.sd.text_encoder
    bg = lab.params.background_words
    end = lab.params.background_end
    plans = [plan_prompts(tok, [["cat"], ["zebra", "striped horse"], ["sky"]], bg, end=end)[0],
             plan_prompts(tok, [["zebra", "striped horse"]], bg, end=end)[0]]
    with torch.inference_mode():
        base, _ = attention.encode_text(tok, te, [pl.text for pl in plans])
    assert emb.shape == base.shape
    for row, pl in enumerate(plans):
        pos = sorted({t for ids in pl.token_ids for t in ids})
        rest = [t for t in range(base.shape[1]) if t not in pos]
        assert len(pos) >= 3
        assert torch.allclose(emb[row, pos], 1.6 * base[row, pos], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(emb[row, pos], base[row, pos])
        assert torch.equal(emb[row, rest], base[row, rest])


def test_mask_score_is_the_mean_map_value_inside_the_mask(lab, monkeypatch):
    import pseudolabel.models.iseg as iseg_module

    real = iseg_module.grid_to_image
    maps_seen = []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        maps_seen.append(out.clone())
        return out

    monkeypatch.setattr(iseg_module, "grid_to_image", spy)
    images = _images()
    # row 0 tagged with every class: its maps are the spied ones (an untagged row's are attenuated after)
    prompts = [{"categories": ["cat", "zebra", "sky"]}, {"points_xy": [[5, 5]], "boxes_xyxy": [[30, 30, 60, 62]]}]
    outs = lab(images, prompts)
    assert len(maps_seen) == 2
    checked = 0
    for out, maps, channels in zip(outs, maps_seen, (["cat", "zebra", "sky"], ["point", "box"])):
        maps = maps.numpy()
        assert maps.shape[0] == len(channels)
        for inst in out.instances:
            k = channels.index(inst.category if out is outs[0] else inst.prompt)
            expected = float(maps[k][inst.mask].mean())
            assert inst.score == pytest.approx(expected, abs=1e-6)
            # not some other statistic of the map
            assert abs(expected - float(maps[k].mean())) > 1e-3
            assert abs(expected - float(maps[k][inst.mask].max())) > 1e-3
            checked += 1
    assert checked >= 2


# ------------------------------------------------------------------------------- the two halves

def test_forward_then_host_half_equals_the_whole_labeler(lab):
    """labeler(images) == forward on the device half, each payload through the engine's byte format,
    postprocess on a host half built from the spec alone (its weights path does not even exist)."""
    from pseudolabel.engine.payload import pack_payload, unpack_payload
    from pseudolabel.models.base import Labeler

    assert ISeg.label is Labeler.label and ISeg.splits() and ISeg.has_device_half()
    images = _images() + _batch_mates() + [_images()[0]]
    prompts = [None,
               {"points_xy": [[5, 5]], "boxes_xyxy": [[30, 30, 60, 62]], "categories": ["zebra", 3]},
               {"lines_xy": [[[3, 3], [40, 70]]], "boxes_xyxy": [[10, 10, 40, 40]]},
               {"categories": ["sky", "cat"]},
               {"categories": ["unicorn"]}]  # no class of the ontology: no maps, an empty semantic layer
    whole = lab(images, prompts)
    payloads = lab.forward(images, prompts)
    host = ISeg.host_half(lab.spec.model_copy(update={"weights": "/nonexistent/iseg-weights"}))
    assert not hasattr(host, "sd") and host.classes == lab.classes

    grid = tuple(int(v) for v in payloads[0]["grid"])
    length = grid[0] * grid[1]
    n_maps = [3, 2, 2, 2, 0]
    for payload, n in zip(payloads, n_maps):
        assert set(payload) == {"maps", "grid", "seeded", "classes", "tagged", "strength"}
        assert all(type(v) is np.ndarray for v in payload.values())  # no tensors, no python objects
        assert payload["maps"].dtype == np.float32 and payload["maps"].shape == (length, n)
        assert payload["grid"].dtype == np.int32 and tuple(payload["grid"]) == grid
        assert payload["seeded"].dtype == bool and payload["seeded"].shape == ()
        assert payload["classes"].dtype == np.int32
        assert payload["tagged"].dtype == bool and payload["tagged"].shape == ()
        assert payload["strength"].dtype == np.float32 and payload["strength"].shape == payload["classes"].shape
    assert [bool(p["seeded"]) for p in payloads] == [False, True, True, False, False]
    assert [p["classes"].tolist() for p in payloads] == [[0, 1, 2], [], [], [2, 0], []]
    assert [bool(p["tagged"]) for p in payloads] == [False, False, False, True, True]

    checked = 0
    for image, prompt, payload, expected in zip(images, prompts, payloads, whole):
        data = pack_payload(payload)
        assert isinstance(data, bytes)
        out = host.postprocess(image, prompt, unpack_payload(data))
        assert_same_output(out, expected)
        checked += len(out.instances)
    assert checked >= 6 and whole[1].instances and whole[2].instances and not whole[4].instances


def test_host_half_loads_no_weights(sd_dir, monkeypatch):
    from pseudolabel.models import attention

    def no_loading(*args, **kwargs):
        raise AssertionError("the host half loaded weights")

    spec = _spec("/nonexistent/iseg-weights")
    host = ISeg.host_half(spec)
    assert host.device == "cpu" and not hasattr(host, "sd")
    assert host.classes == [("cat", 1, ["cat"]), ("zebra", 2, ["zebra", "striped horse"]), ("sky", 3, ["sky"])]
    monkeypatch.setattr(attention, "load_sd_components", no_loading)
    with pytest.raises(AssertionError, match="loaded weights"):
        ISeg(spec)  # the full labeler does load them
    # a payload made by hand: two blocks on an 8x8 grid, classes cat and sky
    _, block = _two_blocks()
    maps = np.stack([block.flatten(), ~block.flatten()], -1).astype(np.float32)
    payload = {"maps": maps, "grid": np.array([8, 8], np.int32), "seeded": np.array(False),
               "classes": np.array([0, 2], np.int32), "tagged": np.array(True), "strength": np.ones(2, np.float32)}
    out = host.postprocess(np.zeros((16, 16, 3), np.uint8), None, payload)
    big = np.kron(block, np.ones((2, 2), bool))
    assert [(i.category, i.category_id, i.prompt) for i in out.instances] == [("cat", 1, "cat"), ("sky", 3, "sky")]
    assert np.array_equal(out.instances[0].mask, big) and np.array_equal(out.instances[1].mask, ~big)
    assert np.array_equal(out.layers["semantic"], np.where(big, 1, 3))
