"""Test-only labelers for fault injection (imported by Ray actors through the tests/ path)."""
from __future__ import annotations

import os

import numpy as np

from pseudolabel.models.base import Instance, Labeler, LabelerParams, LabelOutput


class FlakyParams(LabelerParams):
    fail_width: int = 97
    die_marker: str | None = None  # a path: the first actor to see fail_width exits the process once


class Flaky(Labeler):
    """Labels the bright half of every image; raises for images of width ``fail_width``."""

    name = "flaky"
    Params = FlakyParams

    def label(self, images, prompts):
        outs = []
        for im in images:
            if im.shape[1] == self.params.fail_width:
                marker = self.params.die_marker
                if marker and not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(1)  # the actor process dies mid-batch
                raise ValueError(f"boom on width {im.shape[1]}")
            mask = im.mean(-1) > np.median(im.mean(-1))
            outs.append(LabelOutput(instances=[Instance(mask=mask, category_id=1, category="bright", score=0.5)]))
        return outs


class SplitFlakyParams(LabelerParams):
    forward_fail_width: int = 97  # forward raises for an image of this width (the whole batch fails)
    host_fail_width: int = 61  # postprocess raises for an image of this width


class SplitFlaky(Labeler):
    """A two-half labeler: forward thresholds the image at its median (uint8 mask payload), postprocess
    turns the mask into one instance. Each half raises for images of its own fail width."""

    name = "split_flaky"
    Params = SplitFlakyParams

    def forward(self, images, prompts):
        out = []
        for im in images:
            if im.shape[1] == self.params.forward_fail_width:
                raise ValueError(f"forward boom on width {im.shape[1]}")
            grey = im.mean(-1)
            out.append({"mask": (grey > np.median(grey)).astype(np.uint8)})
        return out

    def postprocess(self, image, prompt, payload):
        if image.shape[1] == self.params.host_fail_width:
            raise ValueError(f"host boom on width {image.shape[1]}")
        return LabelOutput(instances=[Instance(mask=payload["mask"].astype(bool), category_id=1,
                                               category="bright", score=0.5)])


class PreparingFlakyParams(SplitFlakyParams):
    prepare_fail_width: int = 43  # prepare raises for an image of this width


class PreparingFlaky(SplitFlaky):
    """SplitFlaky with a host preparation: ``prepare`` makes the grey image (float32) the forward pass
    thresholds, and raises for images of ``prepare_fail_width``. ``prepared_calls`` counts the forward
    calls that were handed prepared inputs."""

    name = "preparing_flaky"
    Params = PreparingFlakyParams
    prepared_calls = 0

    def prepare(self, image, prompt):
        if image.shape[1] == self.params.prepare_fail_width:
            raise ValueError(f"prepare boom on width {image.shape[1]}")
        return {"grey": image.mean(-1).astype(np.float32)}

    def forward(self, images, prompts, prepared=None):
        if prepared is not None:
            type(self).prepared_calls += 1
        ready = self.prepared_inputs(images, prompts, prepared)
        out = []
        for im, prep in zip(images, ready):
            if im.shape[1] == self.params.forward_fail_width:
                raise ValueError(f"forward boom on width {im.shape[1]}")
            out.append({"mask": (prep["grey"] > np.median(prep["grey"])).astype(np.uint8)})
        return out
