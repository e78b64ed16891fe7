"""iSeg against its reference (linsun449/iseg.code): each step on cases worked out by hand from the
reference's definition, and the labeler through the real loading path with and without tags."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pseudolabel.models.iseg import (
    REFERENCE_CROSS_LAYERS,
    VOC_CROSS_HEADS,
    ISeg,
    ISegParams,
    attenuate,
    entropy_reduce,
    fuse_cross_attention,
    grid_to_image,
    kl_kmeans_smooth,
    kmeans_start_cells,
    labels_from_maps,
    pick_heads,
    plan_prompts,
    refine,
    seeds_from_prompts,
    symmetric_kl,
    symmetric_kl_half,
)
from pseudolabel.models.iseg_tags import ClipTagger, TagParams, pick_tags
from pseudolabel.models.iseg_tokens import (
    REFERENCE_WORDS,
    class_words,
    word_token_offsets,
)
from pseudolabel.schemas.spec import LabelerSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------- k-means

def test_kmeans_start_grid_is_the_references():
    # DFC_KL(32, 20, 64): arange(0, 64, 64 // sqrt(32)) = 0, 11, ..., 55 on both axes, row-major
    cells = kmeans_start_cells((64, 64), 32)
    side = [0, 11, 22, 33, 44, 55]
    assert cells.tolist() == [y * 64 + x for y in side for x in side]
    # 16x16: 16 // 5.66 = 2 -> 0, 2, ..., 14; 8x8: step 1 -> every cell; a non-square grid steps per axis
    assert kmeans_start_cells((16, 16), 32).tolist() == [y * 16 + x for y in range(0, 16, 2) for x in range(0, 16, 2)]
    assert kmeans_start_cells((8, 8), 32).tolist() == list(range(64))
    assert kmeans_start_cells((4, 8), 4).tolist() == [0, 4, 16, 20]


def test_kl_distance_half_precision_by_hand():
    a = torch.tensor([[0.5, 0.5]])
    b = torch.tensor([[1.0, 0.0]])
    # 0.5 * sum (a - b)(ln a - ln b) with 1e-5 added: 0.5 * [(-0.5)(ln .5) + (0.5 - 1e-5)(ln .5 - ln 1e-5)]
    hand = 0.5 * ((0.5 - 1.0) * math.log(0.5) + (0.5 - 1e-5) * (math.log(0.5) - math.log(1e-5)))
    half = symmetric_kl_half(a, b)
    assert half.dtype == torch.float16 and half.shape == (1, 1)
    assert float(half) == pytest.approx(hand, abs=5e-3)
    assert float(symmetric_kl(a, b)) == pytest.approx(hand, abs=1e-4)
    # below float16's resolution near 0.5 (2^-11) two distributions are the same point in the reference
    c = torch.tensor([[0.5 + 1e-4, 0.5 - 1e-4]])
    assert float(symmetric_kl_half(a, c)) == 0.0
    assert float(symmetric_kl(a, c)) > 0.0


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_kmeans_one_iteration_by_hand(precision):
    """4x4 grid, 4 clusters: centres start at cells 0, 2, 8, 10 (step floor(4 / 2) = 2). Each pixel is a
    two-token distribution (p, 1 - p); the quadrant of a start cell holds p near it, except one pixel of
    the top-left quadrant at p = 0.3, which is nearer 0.4 by symmetric KL:
    KL(0.3, 0.1) = 0.5 [0.2 ln 3 + (-0.2) ln(0.7 / 0.9)] = 0.135 > KL(0.3, 0.4) = 0.022."""
    p = torch.tensor([[0.1, 0.1, 0.4, 0.4],
                      [0.1, 0.3, 0.4, 0.4],
                      [0.6, 0.6, 0.9, 0.9],
                      [0.6, 0.6, 0.9, 0.9]]).flatten()
    maps = torch.stack([p, 1 - p], -1)
    out = kl_kmeans_smooth(maps, (4, 4), clusters=4, iters=1, precision=precision)
    expected = p.clone()
    expected[[0, 1, 4]] = 0.1
    expected[[2, 3, 5, 6, 7]] = (0.4 * 4 + 0.3) / 5  # 0.38
    atol = 1e-3 if precision == "float16" else 1e-6
    assert torch.allclose(out[:, 0], expected, atol=atol)
    assert torch.allclose(out.sum(-1), torch.ones(16), atol=atol)
    # a zero entry is clustered as 1e-6: p = 0 at cell 7 is nearest the 0.1 centre
    # (0.5 [0.1 ln(0.1 / 1e-6) + 0.1 ln(1 / 0.9)] = 0.58 against 0.5 [0.4 ln(0.4 / 1e-6) + ...] > 2.5)
    z = maps.clone()
    z[7] = torch.tensor([0.0, 1.0])
    out = kl_kmeans_smooth(z, (4, 4), clusters=4, iters=1, precision="float32")
    assert torch.allclose(out[[0, 1, 4, 7], 0], torch.full((4,), 0.3 / 4), atol=1e-6)
    assert torch.allclose(out[[2, 3, 5, 6], 0], torch.full((4,), (0.4 * 3 + 0.3) / 4), atol=1e-6)


# ------------------------------------------------------------------------------- entropy and refinement

def _f(v: float, lam: float) -> float:
    return v + lam * math.log10(math.e * v)


def test_entropy_reduction_by_hand():
    a = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    # column maxima 0.8, 0.6 -> [[1, 1/3], [1/2, 1]]; v + 0.1 log10(e v); rows normalised
    r0 = [_f(1, 0.1), _f(1 / 3, 0.1)]
    r1 = [_f(0.5, 0.1), _f(1, 0.1)]
    hand = torch.tensor([[r0[0] / sum(r0), r0[1] / sum(r0)], [r1[0] / sum(r1), r1[1] / sum(r1)]])
    assert torch.allclose(entropy_reduce(a, 0.1), hand, atol=1e-6)
    # the seed path clamps at 1 before the row sums: f(1) = 1.0434 -> 1
    c0 = [1.0, _f(1 / 3, 0.1)]
    c1 = [_f(0.5, 0.1), 1.0]
    clamped = torch.tensor([[c0[0] / sum(c0), c0[1] / sum(c0)], [c1[0] / sum(c1), c1[1] / sum(c1)]])
    assert torch.allclose(entropy_reduce(a, 0.1, clamp_max=1.0), clamped, atol=1e-6)
    # ... and normalises rows first: an unnormalised input then gives the same as its normalised rows
    scaled = a * torch.tensor([[2.0], [1.0]])
    assert torch.allclose(entropy_reduce(scaled, 0.1, clamp_max=1.0, row_normalize=True), clamped, atol=1e-6)
    assert not torch.allclose(entropy_reduce(scaled, 0.1), hand, atol=1e-3)
    # an entry with v + lam log10(e v) < 0 is cut: v = 0.05 at lam = 0.1 gives 0.05 - 0.087 < 0
    b = torch.tensor([[0.95, 0.05], [0.0, 1.0]])
    assert float(entropy_reduce(b, 0.1)[0, 1]) == 0.0


def test_refinement_iterations_by_hand():
    aff = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.5, 0.5]])
    x = torch.tensor([[2.0], [1.0], [1.0]])
    # normalise: (x - min) / sum = [1, 0, 0]; one step: aff @ x = [.5, .25, 0] -> [2/3, 1/3, 0]
    assert torch.allclose(refine(x, aff, 0)[:, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(refine(x, aff, 1)[:, 0], torch.tensor([2 / 3, 1 / 3, 0.0]), atol=1e-6)
    # second step: aff @ [2/3, 1/3, 0] = [1/2, 1/3, 1/6] -> minus 1/6 -> [1/3, 1/6, 0] / (1/2)
    assert torch.allclose(refine(x, aff, 2)[:, 0], torch.tensor([2 / 3, 1 / 3, 0.0]), atol=1e-6)
    y = torch.tensor([[0.0], [0.0], [1.0]])
    # [0, 0, 1] -> aff @ = [0, .25, .5] -> [0, 1/3, 2/3] -> aff @ = [1/6, 1/3, 1/2] -> [0, 1/3, 2/3]
    assert torch.allclose(refine(y, aff, 3)[:, 0], torch.tensor([0.0, 1 / 3, 2 / 3]), atol=1e-6)


# ------------------------------------------------------------------------------- attention fusion

def test_cross_attention_fusion_and_heads_by_hand():
    # one token over a 1x2 grid at factor 1 (weight .3) and a 1x1 grid at factor 2 (weight .7)
    fine = torch.tensor([[[0.2], [0.6]]])  # (B, L, T)
    coarse = torch.tensor([[[0.5]]])
    fused = fuse_cross_attention({1: fine, 2: coarse}, {1: (1, 2), 2: (1, 1)}, {1: 0.3, 2: 0.7}, (1, 2))
    # unit mass: fine -> [.25, .75]; coarse -> [1] upsampled to [1, 1]
    assert torch.allclose(fused[0, :, 0], torch.tensor([0.3 * 0.25 + 0.7, 0.3 * 0.75 + 0.7]), atol=1e-6)
    raw = fuse_cross_attention({1: fine, 2: coarse}, {1: (1, 2), 2: (1, 1)}, {1: 0.3, 2: 0.7}, (1, 2), normalize=False)
    assert torch.allclose(raw[0, :, 0], torch.tensor([0.3 * 0.2 + 0.7 * 0.5, 0.3 * 0.6 + 0.7 * 0.5]), atol=1e-6)
    heads = torch.tensor([1.0, 2.0, 6.0]).reshape(1, 3, 1, 1)
    assert float(pick_heads(heads, None, "x")) == pytest.approx(3.0)
    assert float(pick_heads(heads, [0, 2], "x")) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="out of range"):
        pick_heads(heads, [1, 3], "self-attention")
    # the reference's head subsets fit SD 2.1: 3 layers x 10 heads at 32x32, 5 x 20 at 16x16
    assert max(VOC_CROSS_HEADS[2]) < 30 and max(VOC_CROSS_HEADS[4]) < 100


# ------------------------------------------------------------------------------- tokens and prompts

@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    from iseg_tiny import build_sd21_tiny

    return build_sd21_tiny(str(tmp_path_factory.mktemp("iseg_ref") / "sd"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from iseg_tiny import build_tiny_clip

    return build_tiny_clip(str(tmp_path_factory.mktemp("iseg_clip") / "clip"))


@pytest.fixture(scope="module")
def tokenizer(sd_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer")


def test_token_choice(tokenizer):
    assert REFERENCE_WORDS["traffic light"] == ["light"] and REFERENCE_WORDS["potted plant"] == ["plant"]
    # one token per word in this vocabulary; "okapi" is five characters
    assert word_token_offsets(tokenizer, "traffic light", ["light"]) == [1]
    assert word_token_offsets(tokenizer, "okapi light", ["light"]) == [5]
    assert word_token_offsets(tokenizer, "okapi light", ["okapi"]) == [0, 1, 2, 3, 4]
    assert word_token_offsets(tokenizer, "traffic light", None) is None
    with pytest.raises(ValueError, match="none of the words"):
        word_token_offsets(tokenizer, "traffic light", ["lamp"])
    # precedence: prompt override, category override, the reference's table, all tokens
    assert class_words("traffic light", ["traffic light"], {}) == [["light"]]
    assert class_words("signal", ["traffic light", "signal"], {}) == [["light"], None]
    words = class_words("traffic light", ["traffic light", "stoplight"], {"traffic light": "traffic"})
    assert words == [["traffic"], None]
    assert class_words("traffic light", ["traffic light"], {"traffic light": []}) == [None]
    assert class_words("x", ["traffic light"], {"traffic light": ["traffic"]}) == [["traffic"]]
    with pytest.raises(ValueError, match="tokens"):
        class_words("cat", ["cat"], {"cat": "dog"})
    # the chosen token's position in the prompt, and the reference's template with its trailing ','
    choices = [[None], [word_token_offsets(tokenizer, "traffic light", ["light"])]]
    (plan,) = plan_prompts(tokenizer, [["cat"], ["traffic light"]], ["ground", "sky"], choices=choices, end=",")
    assert plan.text == "a photograph of cat and traffic light and other object and background, ground, sky,"
    ids = tokenizer(plan.text).input_ids
    assert plan.token_ids == [[4], [7]]  # start, a, photograph, of, cat(4), and, traffic, light(7)
    assert ids[7] == tokenizer("light", add_special_tokens=False).input_ids[0]
    assert ids[-2] == tokenizer(",", add_special_tokens=False).input_ids[0]  # the last token before the end


# ------------------------------------------------------------------------------- class masking

def test_untagged_classes_are_attenuated_by_hand():
    maps = torch.tensor([[[1.0, 0.5, 0.0]], [[0.2, 1.0, 1.0]]])  # (2, 1, 3), both min-max scaled
    out = attenuate(maps, torch.tensor([0.4, 0.1]))
    assert torch.allclose(out[0], maps[0]) and torch.allclose(out[1], maps[1] * 0.25)
    # at 0.45 the weak class (peak 0.25) wins no pixel; without attenuation it wins two
    assert labels_from_maps(maps, "threshold", 0.45).tolist() == [[1, 2, 2]]
    assert labels_from_maps(out, "threshold", 0.45).tolist() == [[1, 1, 0]]
    assert torch.equal(attenuate(maps, torch.zeros(2)), maps)


def test_host_half_masks_untagged_rows_only(sd_dir):
    spec = LabelerSpec(name="iseg", weights="/nonexistent", ontology=[{"category": "cat"}, {"category": "sky"}],
                       params={"semantic_layer": True})
    host = ISeg.host_half(spec)
    # two classes, identical shapes on a 1x4 grid; "sky" barely attended (raw peak 0.1 of cat's 1.0)
    maps = np.array([[1.0, 0.0], [0.8, 0.2], [0.2, 0.8], [0.0, 1.0]], np.float32)
    payload = {"maps": maps, "grid": np.array([1, 4], np.int32), "seeded": np.array(False),
               "classes": np.array([0, 1], np.int32), "strength": np.array([1.0, 0.1], np.float32)}
    image = np.zeros((4, 16, 3), np.uint8)
    untagged = host.postprocess(image, None, {**payload, "tagged": np.array(False)})
    tagged = host.postprocess(image, None, {**payload, "tagged": np.array(True)})
    assert {i.category for i in untagged.instances} == {"cat"}
    assert {i.category for i in tagged.instances} == {"cat", "sky"}
    everything = ISeg.host_half(spec.model_copy(update={"params": {"untagged": "all"}}))
    untagged = everything.postprocess(image, None, {**payload, "tagged": np.array(False)})
    assert {i.category for i in untagged.instances} == {"cat", "sky"}


# ------------------------------------------------------------------------------- maps to image, seeds

def test_text_maps_go_through_the_mask_size_then_the_image():
    # 1x2 grid [0, 1] -> 2x2 (columns land on the grid: [0, 1]) -> min-max -> 1x4: sample points
    # -0.25, 0.25, 0.75, 1.25 (clamped) give [0, .25, .75, 1] -> min-max with 1e-6 added to the range
    out = grid_to_image(torch.tensor([[0.0], [1.0]]), (1, 2), (1, 4), mask_size=2)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]) / (1 + 1e-6), atol=1e-7)
    # seeds keep their values (no min-max): a grid at the image size is unchanged
    seed = torch.tensor([[0.2], [0.4], [0.6], [1.0]])
    assert torch.allclose(grid_to_image(seed, (2, 2), (2, 2), rescale=False)[0], seed.reshape(2, 2))


def test_seed_cells_and_level_rule_by_hand():
    # 64x64 grid over a 640x480 image: a point at (x=100, y=50) is cell (50 * 64 // 480, 100 * 64 // 640)
    (pt,) = seeds_from_prompts({"points_xy": [[100, 50]]}, (480, 640), (64, 64))
    assert pt.cells == [6 * 64 + 10]
    # the box x 100..130, y 50..80 floors both ends: cols 10..12 (130 * 64 / 640 = 13, exclusive), rows 6..9
    (box,) = seeds_from_prompts({"boxes_xyxy": [[100, 50, 130, 80]]}, (480, 640), (64, 64))
    assert sorted(box.cells) == [y * 64 + x for y in range(6, 10) for x in range(10, 13)]
    # a box inside one cell is still one cell (the reference's is empty and gives NaN)
    (tiny,) = seeds_from_prompts({"boxes_xyxy": [[101, 51, 104, 53]]}, (480, 640), (64, 64))
    assert tiny.cells == [6 * 64 + 10]
    # the tool's rule: argmax over [level, maps]; a tie with the level is background
    maps = torch.tensor([[[0.5, 0.51, 0.9]], [[0.2, 0.6, 0.95]]])
    assert labels_from_maps(maps, "level", 0.5).tolist() == [[0, 2, 2]]


def test_seed_defaults_are_the_interactive_tools():
    p = ISegParams()
    assert ((p.seed_lam, p.seed_iterations, p.seed_threshold, p.seed_self_heads, p.clip_box_seeds)
            == (0.1, 50, 0.5, None, False))
    assert (p.lam, p.iterations, p.text_scale, p.timestep, p.seed, p.self_heads) == (0.1, 10, 1.6, 100, 1101, [1, 2])
    assert ((p.kmeans_clusters, p.kmeans_iters, p.kmeans_precision, p.bg_threshold, p.mask_size)
            == (32, 20, "float16", 0.45, 512))
    assert p.cross_layers == REFERENCE_CROSS_LAYERS and p.cross_head_index() is None
    assert (p.background_end, p.drop_class_words, p.resize, p.untagged) == (",", False, "bilinear", "attenuate")
    voc = ISegParams(preset="voc")
    assert ((voc.lam, voc.background, voc.background_end, voc.cross_head_index())
            == (0.015, "power", "", VOC_CROSS_HEADS))
    assert voc.background_words == ["ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water"]
    assert ISegParams(preset="voc", lam=0.05).lam == 0.05  # explicit params win
    with pytest.raises(ValueError):
        ISegParams(preset="ade")


# ------------------------------------------------------------------------------- tags

def test_pick_tags_relative_rule():
    # cut = min + 0.6 (max - min) = 0.1 + 0.24 = 0.34
    assert pick_tags(np.array([0.1, 0.5, 0.45, 0.2]), 0.6) == [1, 2]
    assert pick_tags(np.array([0.3, 0.3]), 0.6) == [0]  # none above: the argmax alone
    assert pick_tags(np.array([]), 0.6) == []


def test_clip_tagger_scores_by_definition(clip_dir):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tagger = ClipTagger(TagParams(weights=clip_dir, templates=["a photo of a {}."], background_words=["sky"]),
                        [["cat"], ["dog", "car"]])
    model, tok = CLIPModel.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(clip_dir)
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    with torch.inference_mode():
        def feat(texts):
            out = model.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
            e = out if isinstance(out, torch.Tensor) else out.pooler_output
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            return m / m.norm()

        text = torch.stack([feat(["a photo of a cat."]), feat(["a photo of a dog.", "a photo of a car."]),
                            feat(["a photo of a sky."])])
        px = CLIPImageProcessor.from_pretrained(clip_dir)(images=[image], return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=px)
        img = out if isinstance(out, torch.Tensor) else out.pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        probs = (model.logit_scale.exp() * img @ text.T).softmax(-1)[:, :2]
        got = tagger.scores([image])
    assert got.shape == (1, 2) and torch.allclose(got, probs, atol=1e-5)
    assert tagger.tags([image]) == [pick_tags(probs[0].numpy(), 0.6)]
    assert len(ClipTagger(TagParams(weights=clip_dir), [["cat"]]).text_features) == 1 + 23  # + reference background


# ------------------------------------------------------------------------------- the labeler end to end

ONTOLOGY = [{"category": "cat"}, {"category": "traffic light"}, {"category": "sky"}]


def _images():
    rng = np.random.default_rng(3)
    a = np.zeros((72, 96, 3), np.uint8)
    a[:, :40] = (200, 40, 40)
    a[:, 40:] = (30, 60, 200)
    return [np.clip(a + rng.integers(0, 30, a.shape), 0, 255).astype(np.uint8),
            rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]


def _spy_pass(monkeypatch):
    from pseudolabel.models import attention

    real = attention.noisy_unet_pass
    seen = []

    def spy(unet, scheduler, latents, timestep, emb, *args, **kwargs):
        seen.append((emb.clone(), kwargs["noise"].clone(), timestep))
        return real(unet, scheduler, latents, timestep, emb, *args, **kwargs)

    monkeypatch.setattr(attention, "noisy_unet_pass", spy)
    return seen


def test_labeler_without_tags(sd_dir, monkeypatch):
    from pseudolabel.models.attention import encode_text

    lab = ISeg(LabelerSpec(name="iseg", weights=sd_dir, ontology=ONTOLOGY, dtype="float32",
                           params={"resolution": 64, "semantic_layer": True}))
    assert lab.weight_sources() == [sd_dir]
    seen = _spy_pass(monkeypatch)
    images = _images()
    prompts = [None, {"points_xy": [[5, 5]]}]
    payloads = lab.forward(images, prompts)
    (emb, noise, t) = seen[0]
    # the reference's noise: seed 1101, one (1, 4, h, w) draw per image
    ref = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1101))[0]
    assert t == 100 and torch.equal(noise[0], ref) and torch.equal(noise[1], ref)
    # row 0: every class (no tags), "traffic light" carried by "light" only; row 1: the seed prompt " "
    with torch.inference_mode():
        base, _ = encode_text(lab.sd.tokenizer, lab.sd.text_encoder,
                              ["a photograph of cat and traffic light and sky and other object and background, "
                               "ground, land, grass, tree, building, wall, sky, lake, water, river, sea, railway,",
                               " "])
    scaled = {0: [4, 7, 9], 1: [0]}
    for row, pos in scaled.items():
        rest = [i for i in range(base.shape[1]) if i not in pos]
        assert torch.allclose(emb[row, pos], 1.6 * base[row, pos], atol=1e-6)
        assert torch.allclose(emb[row, rest], base[row, rest], atol=1e-6)
    assert not bool(payloads[0]["tagged"]) and payloads[0]["classes"].tolist() == [0, 1, 2]
    assert (payloads[0]["strength"] > 0).all()
    outs = [lab.postprocess(im, pr, pl) for im, pr, pl in zip(images, prompts, payloads)]
    assert outs[0].instances and outs[1].instances and outs[1].instances[0].prompt == "point"
    # on this row every class is attended alike (random weights); a class attended at a tenth of the
    # others' peak loses its pixels when the row is untagged, and keeps them as a tag
    present = {i.category for i in outs[0].instances}
    assert "traffic light" in present
    weak = {**payloads[0], "strength": payloads[0]["strength"] * np.array([1.0, 0.1, 1.0], np.float32)}
    assert "traffic light" not in {i.category for i in lab.postprocess(images[0], None, weak).instances}
    as_tag = lab.postprocess(images[0], None, {**weak, "tagged": np.array(True)})
    assert {i.category for i in as_tag.instances} == present


def test_labeler_with_tags(sd_dir, clip_dir, monkeypatch):
    spec = LabelerSpec(name="iseg", weights=sd_dir, ontology=ONTOLOGY, dtype="float32",
                       params={"resolution": 64, "tags": {"weights": clip_dir, "threshold": 0.6}})
    lab = ISeg(spec)
    assert lab.weight_sources() == [sd_dir, clip_dir]
    host = ISeg.host_half(spec)
    assert not hasattr(host, "tagger") and not hasattr(host, "sd")
    images = _images()
    expected = lab.tagger.tags(images[:1])[0]
    calls = []
    real = lab.tagger.tags
    monkeypatch.setattr(lab.tagger, "tags", lambda ims: calls.append(len(ims)) or real(ims))
    payloads = lab.forward(images, [None, {"categories": ["sky"]}])
    assert calls == [1]  # only the row without categories is tagged
    assert payloads[0]["classes"].tolist() == expected and bool(payloads[0]["tagged"])
    assert payloads[1]["classes"].tolist() == [2] and bool(payloads[1]["tagged"])
    out = host.postprocess(images[0], None, payloads[0])
    assert {i.category for i in out.instances} <= {ONTOLOGY[k]["category"] for k in expected}


def test_cross_heads_index_the_layers_heads_in_unet_order(sd_dir):
    """{factor: [head]} picks one head of the concatenation: at factor 2 head 12 is head 2 of
    up_blocks.2.attentions.0 (after down_blocks.1.attentions.1's 10), at factor 4 head 45 is head 5 of
    up_blocks.1.attentions.0 (after 20 + 20 of down_blocks.2)."""
    from pseudolabel.models.attention import (
        AttentionStore,
        capture_attention,
        encode_image,
        encode_text,
        noisy_unet_pass,
        per_row_noise,
    )

    lab = ISeg(LabelerSpec(name="iseg", weights=sd_dir, ontology=ONTOLOGY, dtype="float32",
                           params={"resolution": 64, "cross_heads": {2: [12], 4: [45]}}))
    sd = lab.sd
    with torch.inference_mode():
        latents = encode_image(sd.vae, _images()[1][None])
        _, grid, cross, _ = lab._attention(latents, ["a photograph of cat"], [[4]], {"text": [1, 2]})
        emb, _ = encode_text(sd.tokenizer, sd.text_encoder, ["a photograph of cat"])
        emb = emb.clone()
        emb[0, [4]] *= 1.6
        store = AttentionStore(layers=["up_blocks.2.attentions.0", "up_blocks.1.attentions.0"], kind="cross",
                               per_head=True)
        with capture_attention(sd.unet, store):
            noisy_unet_pass(sd.unet, sd.scheduler, latents, 100, emb,
                            noise=per_row_noise(1, latents.shape[1:], 1101)[0])
    by_factor = {r.factor: r for r in store.maps.values()}
    expected = fuse_cross_attention({2: by_factor[2].probs[:, 2], 4: by_factor[4].probs[:, 5]},
                                    {2: by_factor[2].hw, 4: by_factor[4].hw}, {4: 0.7, 2: 0.3}, grid)
    assert torch.allclose(cross, expected, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        bad = ISeg(LabelerSpec(name="iseg", weights=sd_dir, ontology=ONTOLOGY, dtype="float32",
                               params={"resolution": 64, "cross_heads": {2: [30]}}))
        bad(_images()[1:], [None])


def test_bad_token_overrides_are_clear_errors():
    spec = dict(name="iseg", weights="/nonexistent", ontology=ONTOLOGY)
    with pytest.raises(ValueError, match="neither categories nor prompts"):
        ISeg.host_half(LabelerSpec(**spec, params={"tokens": {"unicorn": "horn"}}))
    with pytest.raises(ValueError, match="none of"):
        ISeg.host_half(LabelerSpec(**spec, params={"tokens": {"traffic light": "lamp"}}))
    host = ISeg.host_half(LabelerSpec(**spec, params={"tokens": {"traffic light": "traffic"}}))
    assert host.class_words == [[None], [["traffic"]], [None]]
    assert ISeg.host_half(LabelerSpec(**spec)).class_words == [[None], [["light"]], [None]]
    # the per-ontology override: the entry's own ``token`` (it wins over params.tokens for its category)
    ontology = [dict(e, token="traffic") if e["category"] == "traffic light" else e for e in ONTOLOGY]
    own = ISeg.host_half(LabelerSpec(**dict(spec, ontology=ontology), params={"tokens": {"traffic light": "light"}}))
    assert own.class_words == [[None], [["traffic"]], [None]]
    with pytest.raises(ValueError, match="none of"):
        ISeg.host_half(LabelerSpec(**dict(spec, ontology=[dict(e, token="lamp") for e in ONTOLOGY[1:2]])))
