"""``prepare`` of the ``incontext`` labeler's ``seggpt+inpaint`` backend: the query resized by the
checkpoint's SegGPT image processor (uint8) and its original size, made by a ``host_half`` (no weights,
the processor read from ``preprocessor_config.json`` alone); the device's rescale/normalise table equal
to the processor, bit for bit; ``forward`` with prepared inputs (through the engine's byte format) equal
to ``forward`` without them. A tiny random SegGPT, images of at most 64 px."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from prepared import assert_same_arrays, shipped, two_images
from test_incontext_seggpt import save_tiny_seggpt, watermark_pair

from pseudolabel.models.incontext.labeler import InContextSeparator
from pseudolabel.models.incontext.seggpt_inpaint import SegGptInput
from pseudolabel.schemas.spec import LabelerSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def seggpt_dir(tmp_path_factory) -> str:
    return save_tiny_seggpt(str(tmp_path_factory.mktemp("seggpt") / "seggpt"))


def _spec(weights: str, demo_in: str, demo_out: str, **params) -> LabelerSpec:
    return LabelerSpec(name="incontext", weights=weights, params={
        "backend": "seggpt+inpaint", "demo_in": demo_in, "demo_out": demo_out, "fg_threshold": 0.45,
        "min_area": 4, **params})


def _host(weights: str, tmp_path) -> InContextSeparator:
    """A host half whose demonstration images do not exist (it must not read them)."""
    missing = tmp_path / "missing"
    return InContextSeparator.host_half(_spec(weights, str(missing / "in.png"), str(missing / "out.png")))


def test_seggpt_prepare_is_the_uint8_resize_and_the_size(seggpt_dir, tmp_path):
    """``query`` (32, 32, 3) uint8 (the tiny processor's size) and ``size`` (H, W) int64, from a host
    half that loads no weights; equal to the full labeler's prepare and to the processor's resize."""
    from transformers import SegGptImageProcessor

    host = _host(seggpt_dir, tmp_path)
    assert not any(hasattr(host, a) for a in ("finder", "pairs", "demo_masks", "prompts", "inpainter"))
    demo_in, demo_out = watermark_pair(tmp_path)
    lab = InContextSeparator(_spec(seggpt_dir, demo_in, demo_out))
    processor = SegGptImageProcessor.from_pretrained(seggpt_dir)
    for image in two_images():
        out = host.prepare(image, None)
        assert set(out) == {"query", "size"}
        assert out["query"].shape == (32, 32, 3) and out["query"].dtype == np.uint8
        assert out["size"].shape == (2,) and out["size"].dtype == np.int64
        assert tuple(out["size"]) == image.shape[:2]
        resized = processor.preprocess(images=[image], do_rescale=False, do_normalize=False,
                                       return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(out["query"], resized.transpose(1, 2, 0))
        assert_same_arrays(out, lab.prepare(image, None))
    assert host.seggpt_input() is host.seggpt_input()  # read once


@pytest.mark.parametrize("settings", [
    {},
    {"size": {"height": 24, "width": 40}, "resample": 2, "image_mean": [0.5, 0.4, 0.3],
     "image_std": [0.2, 0.25, 0.3], "rescale_factor": 1 / 256},
    {"size": {"height": 40, "width": 24}, "resample": 1, "do_normalize": False},
])
def test_seggpt_table_gives_the_processors_pixel_values(tmp_path, settings):
    """prepare's uint8 resize through the device table == the processor's ``pixel_values``, bit for bit,
    for any processor settings; a checkpoint with only ``preprocessor_config.json`` suffices."""
    from transformers import SegGptImageProcessor

    processor = SegGptImageProcessor(**settings)
    processor.save_pretrained(str(tmp_path / "ck"))
    host = _host(str(tmp_path / "ck"), tmp_path)
    for image in two_images(1):
        out = host.prepare(image, None)
        values = host.seggpt_input().values(torch.from_numpy(out["query"][None]))
        expected = processor.preprocess(images=[image], return_tensors="pt")["pixel_values"]
        assert values.dtype == expected.dtype == torch.float32 and values.shape == expected.shape
        assert values.numpy().tobytes() == expected.numpy().tobytes()


def test_seggpt_prepare_without_processor_config_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        _host(str(tmp_path / "empty"), tmp_path).prepare(two_images()[0], None)
    with pytest.raises(FileNotFoundError):
        SegGptInput.from_checkpoint(str(tmp_path / "nonexistent"))


@pytest.mark.parametrize("pairs", [1, 2])
def test_seggpt_forward_with_prepared_equals_without(seggpt_dir, tmp_path, pairs):
    """forward with the host half's prepared inputs, shipped as bytes == forward without, bit for bit;
    forward does read the prepared query (a blank one changes the payload)."""
    demo_in, demo_out = watermark_pair(tmp_path)
    lab = InContextSeparator(_spec(seggpt_dir, [demo_in] * pairs, [demo_out] * pairs))
    assert len(lab.prompts) == pairs
    images = two_images()
    prepared = shipped([_host(seggpt_dir, tmp_path).prepare(im, None) for im in images])
    with_prepared = lab.forward(images, [None, None], prepared=prepared)
    whole = lab.forward(images, [None, None])
    assert len(with_prepared) == len(whole) == 2
    for a, b, image in zip(with_prepared, whole, images):
        assert_same_arrays(a, b)
        assert a["mask"].shape == (image.shape[0], (image.shape[1] + 7) // 8)
    assert any(a["mask"].any() for a in whole)
    blank = [dict(p) for p in prepared]
    blank[0]["query"] = np.zeros_like(blank[0]["query"])
    changed = lab.forward(images, [None, None], prepared=blank)
    assert changed[0]["mask"].tobytes() != whole[0]["mask"].tobytes()
    assert_same_arrays(changed[1], whole[1])
