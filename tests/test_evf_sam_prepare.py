"""evf_sam's ``prepare``: the host-side network inputs, made on a weight-free host half, and a forward
handed them that gives, bit for bit, the payloads of a forward that prepares the images itself."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pseudolabel.engine.payload import pack_payload, unpack_payload
from pseudolabel.models.evf_sam import labeler as evf_labeler
from pseudolabel.models.evf_sam.labeler import EvfSamLabeler
from pseudolabel.models.evf_sam.model import TOKENIZER_METADATA, MultitaskUndecidedError
from pseudolabel.models.evf_sam.preprocess import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    InputShape,
    beit3_pixels,
    device_sam_pixels,
    sam_pixels,
    sam_prepare,
)
from pseudolabel.models.evf_sam.random_checkpoint import write_random_checkpoint
from pseudolabel.schemas.spec import LabelerSpec

ONTOLOGY = [
    {"category": "square", "prompts": ["square", "a box"]},
    {"category": "circle"},
    {"category": "sky", "semantic": True, "id": 7},
]

#: the tiny random checkpoints' SAM input side
S = 64

#: checkpoint name -> (variant, multitask as the checkpoint's files say)
KINDS = {"sam": ("sam", False), "sam2": ("sam2", False), "sam2-multitask": ("sam2", True)}

#: prepare's arrays per checkpoint kind for a 90 x 120 image: name -> (dtype, shape)
EXPECTED = {
    "sam": {"sam_image": (np.uint8, (48, 64, 3)), "hw": (np.int64, (2,)), "beit": (np.float32, (3, 224, 224))},
    "sam2": {"sam_pixels": (np.float32, (3, 64, 64)), "hw": (np.int64, (2,)), "beit": (np.float32, (3, 224, 224))},
    "sam2-multitask": {"sam_image": (np.uint8, (64, 64, 3)), "hw": (np.int64, (2,)),
                       "beit": (np.float32, (3, 224, 224))},
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Random-weight checkpoints (published layout): kind -> directory. Multitask or not is left to the
    files: the multitask one says so only through its tokenizer (added_tokens.json), like the published one."""
    out = {}
    for kind, (variant, multitask) in KINDS.items():
        d = tmp_path_factory.mktemp(f"evf-{kind}")
        write_random_checkpoint(d, variant, seed=1, multitask=multitask or None)
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("multitask", None)
        (d / "config.json").write_text(json.dumps(cfg))
        out[kind] = str(d)
    return out


@pytest.fixture(scope="module")
def labelers(ckpt):
    """kind -> the full labeler (weights loaded, CPU, float32)."""
    return {kind: EvfSamLabeler(_spec(path), device="cpu") for kind, path in ckpt.items()}


def _spec(weights, **params):
    return LabelerSpec(name="evf_sam", weights=weights, ontology=ONTOLOGY, params=params)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 40, np.uint8)
    img[h // 4: 3 * h // 4, w // 4: w // 2] = (220, 60, 60)
    return np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def _assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
    """Same names, dtypes, shapes and bytes."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert np.ascontiguousarray(a[name]).tobytes() == np.ascontiguousarray(b[name]).tobytes(), name


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load weights or a tokenizer, or to resolve the full checkpoint, fails; every file
    read through ``read_checkpoint_file`` is recorded (the list returned)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the host half loaded something")

    for name in ("load_evf_sam", "load_tokenizer", "_local_checkpoint"):
        monkeypatch.setattr(evf_labeler, name, refuse)
    asked: list[str] = []
    real = evf_labeler.read_checkpoint_file

    def record(weights, filename, storage=None, revision=None):
        asked.append(filename)
        return real(weights, filename, storage, revision)

    monkeypatch.setattr(evf_labeler, "read_checkpoint_file", record)
    return asked


# ------------------------------------------------------------------------------------ prepare's arrays


@pytest.mark.parametrize("kind", list(KINDS))
def test_prepare_gives_compact_arrays_for_a_non_square_image(labelers, kind):
    lab = labelers[kind]
    variant, multitask = KINDS[kind]
    assert lab.input_shape == InputShape(variant, S, 224, multitask)
    image = _image(90, 120)
    got = lab.prepare(image, None)
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (np.dtype(t), s) for k, (t, s)
                                                                 in EXPECTED[kind].items()}
    assert got["hw"].tolist() == ([48, 64] if variant == "sam" else [64, 64])
    assert np.array_equal(got["beit"], beit3_pixels(image).numpy())
    if variant == "sam":                        # a tall image: the other side is the long one
        tall = lab.prepare(_image(120, 50, 1), None)
        assert tall["sam_image"].shape == (64, 27, 3) and tall["hw"].tolist() == [64, 27]


def _reference_sam_input(image: np.ndarray, variant: str, multitask: bool) -> torch.Tensor:
    """(3, S, S) float32 the way the in-process path made it before the split, written out on its own:
    SAM-H: PIL longest side, mean/std, zero pad; SAM-2 multitask: torch bilinear on uint8, mean/std;
    SAM-2 original: PIL longest side, mean/std, float bilinear stretch."""
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    h, w = image.shape[:2]
    scale = S / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    longest = torch.from_numpy(np.array(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR)))
    longest = (longest.permute(2, 0, 1).contiguous().float() - mean) / std
    if variant == "sam":
        return F.pad(longest, (0, S - nw, 0, S - nh))
    if multitask:
        return (F.interpolate(chw[None], size=(S, S), mode="bilinear", align_corners=False)[0].float() - mean) / std
    return F.interpolate(longest[None], size=(S, S), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("h,w", [(90, 120), (120, 50), (64, 64), (33, 77)])
def test_device_half_of_the_sam_input_rebuilds_the_whole_one_bit_for_bit(kind, h, w):
    """sam_prepare on the host + device_sam_pixels == the one-piece reference input, exactly (the
    normalisation moved to the device is elementwise IEEE float32)."""
    variant, multitask = KINDS[kind]
    image = _image(h, w, seed=h + w)
    shipped = unpack_payload(pack_payload(sam_prepare(image, S, variant, multitask)))   # read-only arrays
    got = device_sam_pixels(shipped, S, "cpu")
    ref = _reference_sam_input(image, variant, multitask)
    assert got.dtype == torch.float32 and got.shape == (3, S, S)
    assert torch.equal(got, ref)
    pixels, hw = sam_pixels(image, S, variant, multitask)
    assert torch.equal(pixels, ref) and hw == tuple(shipped["hw"].tolist())


# ------------------------------------------------------------------------------------ the host half


@pytest.mark.parametrize("kind", list(KINDS))
def test_host_half_prepares_what_the_labeler_prepares(labelers, ckpt, no_loading, kind):
    """No weights, no tokenizer: config.json (and, multitask undecided, the tokenizer's metadata files)
    read once; the same arrays as the loaded labeler's prepare."""
    host = EvfSamLabeler.host_half(_spec(ckpt[kind]))
    assert not hasattr(host, "model") and no_loading == []          # nothing read before the first prepare
    images = [_image(90, 120, 0), _image(70, 50, 1)]
    for image in images:
        _assert_same_arrays(host.prepare(image, None), labelers[kind].prepare(image, None))
    assert host.input_shape == labelers[kind].input_shape
    assert no_loading == ["config.json"]                            # once; the local directory's tokenizer
    # files are read in place by model.checkpoint_multitask, never the weights


def test_host_half_with_multitask_set_reads_config_only(ckpt, no_loading):
    host = EvfSamLabeler.host_half(_spec(ckpt["sam2-multitask"], multitask=False))
    assert host.input_shape == InputShape("sam2", S, 224, False)
    assert "sam_pixels" in host.prepare(_image(90, 120), None)       # the original SAM-2 input, as asked
    assert no_loading == ["config.json"]


def test_host_half_of_missing_weights_fails_on_prepare_only(no_loading):
    host = EvfSamLabeler.host_half(_spec("/no/such/evf-sam2"))      # building it reads nothing
    with pytest.raises(FileNotFoundError, match="no config.json"):
        host.prepare(_image(90, 120), None)


@pytest.fixture
def fake_hub(ckpt, monkeypatch):
    """``read_checkpoint_file`` for the hub id ``someone/<kind>`` served from the local checkpoint of that
    kind; returns the list of files asked for."""
    asked: list[str] = []

    def serve(weights, filename, storage=None, revision=None):
        owner, kind = weights.split("/")
        assert owner == "someone"
        asked.append(filename)
        path = Path(ckpt[kind]) / filename
        return path.read_bytes() if path.is_file() else None

    monkeypatch.setattr(evf_labeler, "read_checkpoint_file", serve)
    return asked


@pytest.mark.parametrize("kind", list(KINDS))
def test_hub_host_half_reads_the_small_files_only(labelers, fake_hub, kind):
    """A hub id (or s3:// prefix): multitask or not is decided from config.json and the tokenizer's
    metadata files, fetched one by one; never the weights or the sentencepiece model."""
    host = EvfSamLabeler.host_half(_spec(f"someone/{kind}"))
    image = _image(90, 120, 3)
    _assert_same_arrays(host.prepare(image, None), labelers[kind].prepare(image, None))
    host.prepare(image, None)
    assert set(fake_hub) <= {"config.json", *TOKENIZER_METADATA}
    assert fake_hub.count("config.json") == 2                      # the shape, then the multitask check; once


def test_hub_host_half_names_the_checkpoint_when_multitask_is_undecided(ckpt, tmp_path, monkeypatch):
    def serve(weights, filename, storage=None, revision=None):
        return Path(ckpt["sam2"], filename).read_bytes() if filename == "config.json" else None  # no tokenizer

    monkeypatch.setattr(evf_labeler, "read_checkpoint_file", serve)
    host = EvfSamLabeler.host_half(_spec("someone/evf-sam2-bare"))
    with pytest.raises(MultitaskUndecidedError, match="checkpoint someone/evf-sam2-bare") as err:
        host.prepare(_image(90, 120), None)
    assert "evf-sam-meta-" not in str(err.value)                     # not the temporary directory


def test_s3_host_half_copies_no_weights(labelers, ckpt, s3_bucket, tmp_path, monkeypatch):
    from pseudolabel.storage import filesystem

    monkeypatch.setenv("PSEUDOLABEL_CACHE", str(tmp_path / "cache"))
    bucket, storage = s3_bucket
    uri = f"{bucket}/models/evf-sam2-multitask"
    fs, root = filesystem(uri, storage)
    for name in os.listdir(ckpt["sam2-multitask"]):
        fs.put_file(os.path.join(ckpt["sam2-multitask"], name), f"{root}/{name}")
    host = EvfSamLabeler.host_half(_spec(uri), storage)
    image = _image(90, 120, 4)
    _assert_same_arrays(host.prepare(image, None), labelers["sam2-multitask"].prepare(image, None))
    assert host.input_shape.multitask
    assert not glob.glob(str(tmp_path / "cache" / "**" / "*.safetensors"), recursive=True)   # nothing copied


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_with_prepared_inputs_gives_the_same_payloads(labelers, ckpt, kind):
    """forward(prepared= a host half's arrays, shipped as payload bytes) == forward(), bit for bit."""
    lab = labelers[kind]
    images = [_image(90, 120, 0), _image(70, 50, 1), _image(33, 77, 2)]
    host = EvfSamLabeler.host_half(_spec(ckpt[kind]))
    prepared = [unpack_payload(pack_payload(host.prepare(im, None))) for im in images]
    split = lab.forward(images, [None] * len(images), prepared=prepared)
    whole = lab.forward(images, [None] * len(images))
    assert len(split) == len(whole) == len(images)
    for a, b in zip(split, whole):
        _assert_same_arrays(a, b)
    assert any(p["masks"].any() for p in whole)                       # random weights still give masks


def test_forward_refuses_prepared_inputs_of_another_batch(labelers):
    lab = labelers["sam"]
    images = [_image(90, 120, 0), _image(70, 50, 1)]
    with pytest.raises(RuntimeError, match="1 prepared inputs for 2 images"):
        lab.forward(images, [None, None], prepared=[lab.prepare(images[0], None)])
    with pytest.raises(ValueError, match="no prepared inputs for images \\[1\\]"):
        lab.forward(images, [None, None], prepared=[lab.prepare(images[0], None), None])
