"""Benchmark-only labelers (imported by Ray workers with bench/ on PYTHONPATH).

``FixedMaps``: a device half that costs ~nothing (it hands over a fixed synthetic boundary map, the
same for every image of a size) and DirectSAM's full host half (partition tokens, boundary scores).
It isolates what the engine does with host work: in parallel CPU tasks, or inside the actor.
"""
from __future__ import annotations

import functools

import numpy as np

from pseudolabel.models.base import Labeler, LabelerParams, LabelOutput
from pseudolabel.models.tokens import boundary_to_tokens


class FixedMapsParams(LabelerParams):
    cells: int = 1000
    threshold: float = 0.2


def voronoi_boundary(height: int, width: int, cells: int, seed: int = 0) -> np.ndarray:
    """(H, W) uint16 boundary map (value / 65535 = probability): blurred edges of a random Voronoi
    partition with faint noise."""
    import cv2

    rng = np.random.default_rng(seed)
    pts = rng.random((cells, 2)) * [height, width]
    yy, xx = np.mgrid[0:height, 0:width]
    best = np.full((height, width), np.inf)
    label = np.zeros((height, width), np.int32)
    for k, (py, px) in enumerate(pts):
        d = (yy - py) ** 2 + (xx - px) ** 2
        closer = d < best
        best[closer], label[closer] = d[closer], k
    edges = np.zeros((height, width), np.float32)
    edges[:, 1:] += label[:, 1:] != label[:, :-1]
    edges[1:, :] += label[1:, :] != label[:-1, :]
    prob = cv2.GaussianBlur(np.clip(edges, 0, 1), (0, 0), 1.0) * 2 + rng.random((height, width)) * 0.05
    return np.rint(np.clip(prob, 0, 1) * 65535).astype(np.uint16)


class FixedMaps(Labeler):
    name = "fixed_maps"
    Params = FixedMapsParams

    def setup_host(self) -> None:
        self._maps: dict[tuple[int, int], np.ndarray] = {}

    def forward(self, images, prompts):
        out = []
        for im in images:
            hw = im.shape[:2]
            if hw not in self._maps:
                self._maps[hw] = voronoi_boundary(hw[0], hw[1], self.params.cells)
            out.append({"boundary": self._maps[hw]})
        return out

    def postprocess(self, image, prompt, payload):
        prob = payload["boundary"].astype(np.float32) / np.float32(65535)
        return LabelOutput(tokens=boundary_to_tokens(prob, self.params.threshold, "partition"))


class ResizedViewsParams(FixedMapsParams):
    resolution: int = 1024
    pyramid_layers: int = 0


class ResizedViews(FixedMaps):
    """DirectSAM's input preparation without its network: ``prepare`` resizes every view of the image to
    ``resolution`` with PIL bilinear (DirectSAM's ``pyramid_views``, its image processor's resize) and
    the device half only reads the views before handing over ``FixedMaps``' boundary map. Where the
    resize runs (decode tasks or actor) is then the only difference between two plans."""

    name = "resized_views"
    Params = ResizedViewsParams
    params: ResizedViewsParams

    def setup_host(self) -> None:
        from pseudolabel.models.directsam_views import Preprocessing

        super().setup_host()
        self.pre = Preprocessing(size=(self.params.resolution, self.params.resolution))

    def prepare(self, image, prompt):
        from pseudolabel.models.directsam_views import pyramid_views

        return {"views": pyramid_views(image, self.pre, self.params.pyramid_layers)}

    def forward(self, images, prompts, prepared=None):
        ready = self.prepared_inputs(images, prompts, prepared)
        out = super().forward(images, prompts)
        for payload, views in zip(out, ready):
            payload["view_sum"] = np.array([int(views["views"][:, ::97, ::97].sum())])  # the device's read
        return out


class ResizedViewsInActor(ResizedViews):
    """``ResizedViews`` with no ``prepare`` for the engine: its forward resizes the views in the actor."""

    name = "resized_views_in_actor"

    @classmethod
    def prepares(cls) -> bool:
        return False


@functools.lru_cache(maxsize=None)
def _directsam_resizing_in_actor():
    from pseudolabel.models.directsam import DirectSAM

    class DirectSAMResizeInActor(DirectSAM):
        """DirectSAM with its views resized in the actor, between forward passes (as before ``prepare``
        ran in the decode tasks): the engine sees no ``prepare`` and calls ``forward(images, prompts)``,
        which then prepares every image itself."""

        name = "directsam_resize_in_actor"

        @classmethod
        def prepares(cls) -> bool:
            return False

    return DirectSAMResizeInActor


def __getattr__(name: str):
    # built on first use, so importing this module does not import torch and transformers
    if name == "DirectSAMResizeInActor":
        return _directsam_resizing_in_actor()
    raise AttributeError(name)
