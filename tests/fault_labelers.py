"""Test-only labelers for fault injection (imported by Ray actors through the tests/ path)."""
from __future__ import annotations

import os

import numpy as np

from pseudolabel.models.base import Instance, LabelerParams, LabelOutput, Labeler


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
