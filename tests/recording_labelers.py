"""Test-only labelers that record what the engine hands them (imported by Ray actors through tests/)."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from pseudolabel.models.base import Instance, Labeler, LabelerParams, LabelOutput


class RecordingParams(LabelerParams):
    log: str | None = None  # a path: one JSON line per call, [[h, w], ...] of the images it got
    pid_log: str | None = None  # a path: the process id of each call, one line each (to kill that process)
    sleep_s: float = 0.0  # seconds each call takes on top (keeps a job inside its labelling phase)


def _record(params: RecordingParams, images: list[np.ndarray]) -> None:
    # one short append per call: lines from several processes stay whole
    if params.pid_log:
        with open(params.pid_log, "a") as f:
            f.write(f"{os.getpid()}\n")
    if params.log:
        with open(params.log, "a") as f:
            f.write(json.dumps([[int(im.shape[0]), int(im.shape[1])] for im in images]) + "\n")
    if params.sleep_s:
        time.sleep(params.sleep_s)


def _label_of(image: np.ndarray) -> LabelOutput:
    """One instance: the pixels brighter than the image's mean (a function of the pixels only)."""
    grey = image.mean(-1)
    return LabelOutput(instances=[Instance(mask=grey > grey.mean(), category_id=1, category="bright",
                                           score=float(image[0, 0, 0]) / 255.0)])


class RecordingWhole(Labeler):
    """Runs whole in its actor (implements only ``label``) and logs the sizes of every call."""

    name = "recording_whole"
    Params = RecordingParams

    def label(self, images, prompts):
        _record(self.params, images)
        return [_label_of(im) for im in images]


class RecordingHost(Labeler):
    """No network: the engine runs its ``postprocess`` in host tasks; logs each image it labels."""

    name = "recording_host"
    Params = RecordingParams

    def postprocess(self, image, prompt, payload):
        _record(self.params, [image])
        return _label_of(image)


def calls(path: str) -> list[list[list[int]]]:
    """The logged calls, each a list of [h, w]."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pids(path: str) -> list[int]:
    """The process ids logged through ``pid_log``, in call order."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(line) for line in f if line.strip()]
