"""``prepare`` of the diffusion and in-context labelers (iseg, foba, incontext): the host half's output
(keys, shapes, dtypes) on non-square images, the same output from a ``host_half`` instance (no weights),
and ``forward`` with prepared inputs (through the engine's byte format) equal, bit for bit, to
``forward`` without them. Tiny random models, images of at most 64 px."""
from __future__ import annotations

import inspect

import cv2
import numpy as np
import pytest
from prepared import assert_same_arrays, assert_same_payloads, shipped, two_images

from pseudolabel.models.foba import FoBa
from pseudolabel.models.foba_steps import long_edge_size, pad_to_canvas, resize_long_edge
from pseudolabel.models.incontext import canvas as cv
from pseudolabel.models.incontext.labeler import InContextSeparator
from pseudolabel.models.iseg import ISeg
from pseudolabel.schemas.spec import LabelerSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blanked(prepared: list[dict[str, np.ndarray]], key: str) -> list[dict[str, np.ndarray]]:
    """The prepared inputs with ``key`` of the first image zeroed: forward must see the difference."""
    out = [dict(p) for p in prepared]
    out[0][key] = np.zeros_like(out[0][key])
    return out


def _differs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return any(a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes() for k in a)


def test_every_forward_takes_prepared_and_the_labelers_prepare():
    for cls in (ISeg, FoBa, InContextSeparator):
        param = inspect.signature(cls.forward).parameters["prepared"]
        assert param.default is None
        assert cls.prepares() and cls.splits() and cls.has_device_half()


# ------------------------------------------------------------------------------------------------- iseg

ISEG_ONTOLOGY = [{"category": "cat"}, {"category": "sky"}]


@pytest.fixture(scope="module")
def iseg_sd(tmp_path_factory):
    from iseg_tiny import build_sd21_tiny

    return build_sd21_tiny(str(tmp_path_factory.mktemp("prepare_iseg") / "sd"))


def _iseg_spec(weights: str, **params) -> LabelerSpec:
    return LabelerSpec(name="iseg", weights=weights, ontology=ISEG_ONTOLOGY, dtype="float32",
                       params={"resolution": 64, "iterations": 3, **params})


@pytest.mark.parametrize("resize", ["bilinear", "area"])
def test_iseg_prepare_resizes_to_the_sd_input_size(resize):
    """``pixels`` (S, S, 3) float32: the float image resized bilinearly (the reference), or, with
    ``resize="area"``, the uint8 image area-resized when it shrinks; a host half without weights."""
    host = ISeg.host_half(_iseg_spec("/nonexistent/iseg-weights", resize=resize))
    assert not hasattr(host, "sd")
    big = cv2.resize(two_images()[0], (128, 96), interpolation=cv2.INTER_LINEAR)  # shrinks: area applies
    for image in two_images() + [big]:
        out = host.prepare(image, None)
        assert set(out) == {"pixels"}
        assert out["pixels"].shape == (64, 64, 3) and out["pixels"].dtype == np.float32
        if resize == "area" and min(image.shape[:2]) > 64:
            expected = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
        else:
            expected = cv2.resize(image.astype(np.float32), (64, 64), interpolation=cv2.INTER_LINEAR)
        assert_same_arrays(out, {"pixels": expected})
        assert 0.0 <= out["pixels"].min() and out["pixels"].max() <= 255.0


def test_iseg_forward_with_prepared_equals_without(iseg_sd):
    lab = ISeg(_iseg_spec(iseg_sd))
    host = ISeg.host_half(_iseg_spec("/nonexistent/iseg-weights"))
    images = two_images()
    prompts = [None, {"points_xy": [[10, 20]], "categories": ["sky"]}]
    prepared = [host.prepare(im, pr) for im, pr in zip(images, prompts)]
    for mine, theirs in zip(prepared, [lab.prepare(im, pr) for im, pr in zip(images, prompts)]):
        assert mine["pixels"].shape == (64, 64, 3)
        assert_same_arrays(mine, theirs)
    whole = lab.forward(images, prompts)
    assert_same_payloads(lab.forward(images, prompts, prepared=shipped(prepared)), whole)
    assert _differs(lab.forward(images, prompts, prepared=_blanked(prepared, "pixels"))[0], whole[0])


# ------------------------------------------------------------------------------------------------- foba

FOBA_FAST = {"resolution": 64, "attention_steps": 2, "attention_stride": 300, "inpaint_steps": 2}


def test_foba_prepare_is_the_top_left_canvas_and_the_part_size():
    host = FoBa.host_half(LabelerSpec(name="foba", weights="/nonexistent/sd", params=FOBA_FAST,
                                      ontology=[{"category": "cat"}]))
    assert not hasattr(host, "sd")
    for image in two_images():
        out = host.prepare(image, None)
        assert set(out) == {"canvas", "part"}
        assert out["canvas"].shape == (64, 64, 3) and out["canvas"].dtype == np.uint8
        assert out["part"].shape == (2,) and out["part"].dtype == np.int32
        part = long_edge_size(image.shape[:2], 64)
        assert tuple(out["part"]) == part and max(part) == 64
        np.testing.assert_array_equal(out["canvas"], pad_to_canvas(resize_long_edge(image, 64), 64))
        assert not out["canvas"][part[0]:].any() and not out["canvas"][:, part[1]:].any()  # black padding


@pytest.mark.parametrize("params", [{}, {"refine": False}], ids=["refine", "preliminary"])
def test_foba_forward_with_prepared_equals_without(tiny_sd, params):
    spec = LabelerSpec(name="foba", weights=tiny_sd, params={**FOBA_FAST, **params},
                       ontology=[{"category": "cat"}, {"category": "zebra"}])
    lab = FoBa(spec)
    host = FoBa.host_half(spec.model_copy(update={"weights": "/nonexistent/sd"}))
    images = two_images() + [two_images(seed=1)[0]]
    prompts = [None, {"category": "zebra"}, None]  # two class groups, rows out of order
    prepared = [host.prepare(im, pr) for im, pr in zip(images, prompts)]
    for mine, image, prompt in zip(prepared, images, prompts):
        assert_same_arrays(mine, lab.prepare(image, prompt))
    whole = lab.forward(images, prompts)
    assert_same_payloads(lab.forward(images, prompts, prepared=shipped(prepared)), whole)
    assert _differs(lab.forward(images, prompts, prepared=_blanked(prepared, "canvas"))[0], whole[0])


def test_foba_segmentation_network_prepare_reads_its_resolution_without_weights(tmp_path, monkeypatch):
    """With ``segmentation_weights`` prepare makes the network's input, ``pixels`` (3, h, w) float32 in
    [-1, 1] with the short edge at the resolution in the checkpoint's config.json (read without loading
    the network)."""
    import torch
    from foba_tiny import build_tiny_segnet

    from pseudolabel.models import foba
    from pseudolabel.models.foba_segnet import segnet_input

    path = build_tiny_segnet(str(tmp_path / "segnet"), width=2, resolution=16)
    spec = LabelerSpec(name="foba", weights="/nonexistent/sd", ontology=[{"category": "cat"}],
                       params={"segmentation_weights": path})
    lab = FoBa(spec)
    images = two_images()

    def no_loading(*args, **kwargs):
        raise AssertionError("the host half loaded the network")

    monkeypatch.setattr(foba, "load_segnet", no_loading)
    host = FoBa.host_half(spec)
    prepared = [host.prepare(im, None) for im in images]
    for image, out, size in zip(images, prepared, [(16, 21), (25, 16)]):
        assert set(out) == {"pixels"}
        assert out["pixels"].shape == (3, *size) and out["pixels"].dtype == np.float32
        assert -1.0 <= out["pixels"].min() and out["pixels"].max() <= 1.0
        np.testing.assert_array_equal(out["pixels"], segnet_input(image, 16)[0].numpy())
        assert_same_arrays(out, lab.prepare(image, None))
    with torch.inference_mode():
        assert_same_payloads(lab.forward(images, [None, None], prepared=shipped(prepared)),
                              lab.forward(images, [None, None]))


# ------------------------------------------------------------------------------------------------- incontext

def _demo_files(tmp_path) -> tuple[str, str]:
    rng = np.random.default_rng(3)
    clean = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    marked = clean.copy()
    marked[10:20, 8:40] = 255
    paths = []
    for name, rgb in (("in.png", marked), ("out.png", clean)):
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        paths.append(str(tmp_path / name))
    return paths[0], paths[1]


def _sefm_checkpoint(path, cell: int = 32) -> str:
    """A tiny sefm-small whose weights are moved off the identity (it changes its input)."""
    import torch

    from pseudolabel.models.incontext.sefm import SeFM, SeFMConfig

    torch.manual_seed(0)
    net = SeFM(SeFMConfig(arch="sefm-small", width=8, enc_blocks=[1, 1], dec_blocks=[1], refine_blocks=0,
                          heads=[1, 2], ffn_expansion=2.0, cell=cell))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    net.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_incontext_sefm_prepare_is_the_query_cell(tmp_path, dtype):
    """``query_cell`` (cell, cell, 3) float32 in [0, 1] with the checkpoint's cell, read by a host half
    from config.json alone; forward with prepared cells == forward without."""
    ck = _sefm_checkpoint(tmp_path / "ck", cell=32)
    demo_in, demo_out = _demo_files(tmp_path)
    spec = LabelerSpec(name="incontext", weights=ck, dtype=dtype,
                       params={"backend": "sefm", "demo_in": demo_in, "demo_out": demo_out})
    lab = InContextSeparator(spec)
    # the host half reads neither the weights nor the demonstration pair
    missing = tmp_path / "missing"
    host = InContextSeparator.host_half(spec.model_copy(update={"params": {
        "backend": "sefm", "demo_in": str(missing / "in.png"), "demo_out": str(missing / "out.png")}}))
    assert not any(hasattr(host, a) for a in ("net", "pairs", "cell", "demo_cells"))
    images = two_images()
    prepared = [host.prepare(im, None) for im in images]
    for image, out in zip(images, prepared):
        assert set(out) == {"query_cell"}
        assert out["query_cell"].shape == (32, 32, 3) and out["query_cell"].dtype == np.float32
        assert 0.0 <= out["query_cell"].min() and out["query_cell"].max() <= 1.0
        np.testing.assert_array_equal(out["query_cell"], cv.to_cell(image.astype(np.float32) / 255.0, 32))
        assert_same_arrays(out, lab.prepare(image, None))
    with_prepared = lab.forward(images, [None, None], prepared=shipped(prepared))
    whole = lab.forward(images, [None, None])
    assert_same_payloads(with_prepared, whole)
    assert _differs(lab.forward(images, [None, None], prepared=_blanked(prepared, "query_cell"))[0], whole[0])
    assert with_prepared[0]["answer"].shape == (1, 32, 32, 3)


def test_incontext_sefm_cell_param_and_untrained_default(tmp_path):
    """``params.cell`` wins over the checkpoint; without weights (an untrained network) the default cell."""
    demo_in, demo_out = _demo_files(tmp_path)
    base = {"backend": "sefm", "demo_in": demo_in, "demo_out": demo_out}
    host = InContextSeparator.host_half(LabelerSpec(name="incontext", weights="/nonexistent/ck",
                                                    params={**base, "cell": 16}))
    assert host.prepare(two_images()[0], None)["query_cell"].shape == (16, 16, 3)
    spec = LabelerSpec(name="incontext", params={**base, "allow_untrained": True, "cell": 24})
    lab = InContextSeparator(spec)
    host = InContextSeparator.host_half(spec.model_copy(update={"params": {**base, "allow_untrained": True}}))
    assert host.cell_side() == lab.net.config.cell
    images = two_images()
    prepared = shipped([lab.prepare(im, None) for im in images])
    assert_same_payloads(lab.forward(images, [None, None], prepared=prepared), lab.forward(images, [None, None]))
