"""The ``incontext`` labeler's diffusion inpainting (``inpaint_weights``): a tiny random Stable Diffusion
inpainting pipeline (UNet with 9 input channels: latents + mask + masked-image latents) in diffusers
layout, loaded through ``AutoPipelineForInpainting`` like a real checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
from halves import assert_same_outputs
from test_incontext_seggpt import _queries, calibrated_threshold, save_tiny_seggpt, split_outputs, watermark_pair

from pseudolabel.models.incontext.component import decode_query, dilate
from pseudolabel.models.registry import labeler_class
from pseudolabel.schemas.spec import LabelerSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_tiny_sd_inpainting(tiny_sd: str, directory: str, seed: int = 1) -> str:
    """The tiny SD's VAE, text encoder, tokenizer and scheduler with a new random 9-channel UNet of the
    same layout, saved as a StableDiffusionInpaintPipeline (model_index.json + one folder per part)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    config = dict(UNet2DConditionModel.load_config(tiny_sd, subfolder="unet"))
    config["in_channels"] = 9
    torch.manual_seed(seed)
    pipe = StableDiffusionInpaintPipeline(
        vae=AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_config(config),
        scheduler=DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def test_diffusion_inpainting_changes_only_the_found_component(tmp_path, tiny_sd):
    from diffusers import StableDiffusionInpaintPipeline

    from pseudolabel.models.inpainting import DiffusionInpainter

    inpaint_dir = save_tiny_sd_inpainting(tiny_sd, str(tmp_path / "sd-inpaint"))
    model_dir = save_tiny_seggpt(str(tmp_path / "seggpt"))
    demo_in, demo_out = watermark_pair(tmp_path)
    images = _queries()
    thr = calibrated_threshold(model_dir, demo_in, demo_out, images)
    params = {"backend": "seggpt+inpaint", "demo_in": demo_in, "demo_out": demo_out, "fg_threshold": thr,
              "min_area": 4}
    diffusion = labeler_class("incontext")(LabelerSpec(
        name="incontext", weights=model_dir, params={**params, "inpaint_weights": inpaint_dir, "inpaint_steps": 2,
                                                     "inpaint_resolution": 64, "inpaint_prompt": "background"}))
    # the real pipeline class, with the inpainting UNet
    assert isinstance(diffusion.inpainter, DiffusionInpainter)
    assert isinstance(diffusion.inpainter.pipe, StableDiffusionInpaintPipeline)
    assert diffusion.inpainter.pipe.unet.config.in_channels == 9 and diffusion.inpainter.resolution == 64
    opencv = labeler_class("incontext")(LabelerSpec(name="incontext", weights=model_dir, params=params))
    outs, baseline = diffusion(images), opencv(images)
    for im, out, base in zip(images, outs, baseline):
        clean, comp = out.layers["clean"], out.layers["component"]
        assert clean.shape == im.shape and clean.dtype == np.uint8
        np.testing.assert_array_equal(decode_query(clean, comp), im)
        assert len(out.instances) == 1
        mask = out.instances[0].mask
        np.testing.assert_array_equal(mask, base.instances[0].mask)  # the same SegGPT mask either way
        region = dilate(mask, diffusion.params.inpaint_dilate)
        # outside the (dilated) mask every pixel is the query's; inside, the diffusion pipeline painted
        np.testing.assert_array_equal(clean[~region], im[~region])
        assert (clean[region] != im[region]).any(axis=-1).mean() > 0.5
        assert not np.array_equal(clean[region], base.layers["clean"][region])  # not OpenCV's fill
    # the two halves: the diffusion inpainting is device work, so its clean image travels in the payload
    # and the (weight-free) host half returns it as is
    split, payloads = split_outputs(diffusion, images)
    assert_same_outputs(outs, split)
    for im, out, pl in zip(images, outs, payloads):
        assert set(pl) == {"mask", "score", "clean"}
        assert pl["clean"].dtype == np.uint8 and pl["clean"].shape == im.shape
        np.testing.assert_array_equal(pl["clean"], out.layers["clean"])
