"""The public-weights path: SegGPT finds the demonstrated component in the query, inpainting removes it.

1. demo mask = where demo in and demo out differ (``component.difference_mask``);
2. transformers' ``SegGptForImageSegmentation`` segments the same component in each query from the
   prompt (demo in, demo mask): SegGPT paints the query's mask in the lower half of its
   [prompt; query] canvas; several demonstration pairs are run one by one and their foreground
   probabilities averaged;
3. the query is inpainted inside the (dilated) mask: OpenCV by default, a diffusers inpainting pipeline
   when one is given (``pseudolabel.models.inpainting``).

The query's input is made in two steps, so that the first can run without the weights (the engine's
decode tasks, ``Labeler.prepare``):

- host (``SegGptInput.prepare``): the checkpoint's image processor resizes the (H, W, 3) uint8 query
  to its input size (PIL, the processor's ``resample`` filter, on uint8 pixels), rescale and normalise
  switched off: (h, w, 3) uint8, and the query's original (H, W);
- device (``SegGptInput.values``): rescale and normalise as a per-channel table of 256 float32 values,
  made by the same processor from the 256 grey levels, so the network input equals the processor's
  output bit for bit.

Weights: any SegGPT checkpoint in the transformers layout (e.g. the hub's ``BAAI/seggpt-vit-large``,
a local directory or an s3:// prefix resolved to one) with its ``SegGptImageProcessor``. The host step
reads the checkpoint's ``preprocessor_config.json`` alone.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pseudolabel.models.device import channel_lookup, compiled, to_device, to_host

if TYPE_CHECKING:
    from pseudolabel.schemas.spec import StorageSpec

#: the image processor's settings file in a checkpoint
PROCESSOR_CONFIG = "preprocessor_config.json"


class SegGptInput:
    """The host part of SegGPT's input: the checkpoint's image processor, no weights.

    Args:
        processor: a transformers ``SegGptImageProcessor`` (any backend whose resize keeps uint8).
    """

    def __init__(self, processor: Any):
        self.processor = processor
        self._table: np.ndarray | None = None

    @classmethod
    def from_checkpoint(cls, weights: str, storage: StorageSpec | None = None,
                        revision: str | None = None) -> SegGptInput:
        """The processor of a checkpoint (local dir, s3:// prefix or hub id) from its
        ``preprocessor_config.json`` alone; FileNotFoundError when the checkpoint has none."""
        from transformers import SegGptImageProcessor

        from pseudolabel.models.weights import read_checkpoint_file

        raw = read_checkpoint_file(weights, PROCESSOR_CONFIG, storage, revision)
        if raw is None:
            raise FileNotFoundError(f"{weights}: no {PROCESSOR_CONFIG} (SegGPT's image processor settings)")
        return cls(SegGptImageProcessor.from_dict(json.loads(raw)))

    def prepare(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """One (H, W, 3) uint8 RGB query -> ``query`` (h, w, 3) uint8, the processor's resize of it
        (rescale and normalise left to ``values``), and ``size`` (2,) int64, the original (H, W)."""
        out = self.processor.preprocess(images=[image], do_rescale=False, do_normalize=False,
                                        input_data_format="channels_last", return_tensors="np")
        resized = np.asarray(out["pixel_values"][0])  # (3, h, w)
        if resized.dtype != np.uint8:
            raise TypeError(f"SegGPT's image processor resized a uint8 query to {resized.dtype}; "
                            "the prepared query is the uint8 resize")
        return {"query": np.ascontiguousarray(resized.transpose(1, 2, 0)),
                "size": np.asarray(image.shape[:2], np.int64)}

    def table(self) -> np.ndarray:
        """(3, 256) float32: the processor's rescaled, normalised value of each uint8 level per channel
        (the processor run on a 16×16 image holding the 256 levels in every channel, no resize)."""
        if self._table is None:
            levels = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
            out = self.processor.preprocess(images=[levels], do_resize=False, input_data_format="channels_last",
                                            return_tensors="np")
            self._table = np.asarray(out["pixel_values"][0], np.float32).reshape(3, 256)
        return self._table

    def values(self, queries: torch.Tensor) -> torch.Tensor:
        """(N, h, w, 3) uint8 resized queries (any device) -> (N, 3, h, w) float32 network input, equal to
        the processor's ``pixel_values``."""
        return channel_lookup(self.table(), queries.permute(0, 3, 1, 2))


class SegGptFinder:
    """SegGPT wrapper: (queries, demo images, demo masks) -> per-query foreground probability.

    Args:
        weights: local directory (or hub id) holding a SegGptForImageSegmentation and its processor.
        device: ``cpu`` or ``cuda[:N]``; dtype: torch dtype for the model (float32 on CPU).
        embedding_type: SegGPT's prompt type, ``instance`` or ``semantic``.
        compile: run the SegGPT network through ``torch.compile`` (``pseudolabel.models.device.compiled``).
    """

    def __init__(self, weights: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 embedding_type: str = "instance", compile: bool = False):
        from transformers import SegGptForImageSegmentation, SegGptImageProcessor

        self.processor = SegGptImageProcessor.from_pretrained(weights)
        #: the host part of the queries' input (the same processor)
        self.input = SegGptInput(self.processor)
        self.model = SegGptForImageSegmentation.from_pretrained(weights, torch_dtype=dtype, use_safetensors=True)
        # transformers' wrapper around Module.to hides its signature from type checkers
        self.model.to(device).eval()  # type: ignore[arg-type]
        self.run = compiled(self.model, compile, "incontext")
        self.device, self.dtype, self.embedding_type = device, dtype, embedding_type

    def prompt(self, demo_image: np.ndarray, demo_mask: np.ndarray) -> dict[str, torch.Tensor]:
        """One demonstration -> SegGPT's prompt on the model's device, in its dtype:
        ``prompt_pixel_values`` and ``prompt_masks``, (1, 3, h, w) each.

        Args:
            demo_image: (h0, w0, 3) uint8 RGB; demo_mask: (h0, w0) bool, the component in ``demo_image``
                (a 1-label segmentation map: palette 0 black, 1 white).
        """
        batch = self.processor.preprocess(images=None, prompt_images=[demo_image],
                                          prompt_masks=[demo_mask.astype(np.uint8)], num_labels=1,
                                          return_tensors="pt")
        return {k: v.to(self.device, self.dtype) for k, v in batch.items()}

    def pixel_values(self, queries: list[np.ndarray]) -> torch.Tensor:
        """N prepared queries (h, w, 3) uint8 (``SegGptInput.prepare``) -> (N, 3, h, w) network input on
        the model's device, in its dtype."""
        stacked = to_device(np.stack(queries), self.device)
        return self.input.values(stacked).to(self.dtype)

    @torch.inference_mode()
    def probabilities(self, pixel_values: torch.Tensor, prompt: dict[str, torch.Tensor],
                      sizes: list[tuple[int, int]], host: bool = True) -> list[np.ndarray] | list[torch.Tensor]:
        """Foreground probability of N prepared queries for one prompt.

        Args:
            pixel_values: (N, 3, h, w) from ``pixel_values``; prompt: from ``prompt``.
            sizes: the N queries' original (H_i, W_i).
            host: NumPy arrays (True) or float32 tensors left on the model's device (False).

        Returns:
            list of (H_i, W_i) float32 in [0, 1] (arrays or tensors, see ``host``): the grey level of
            SegGPT's painted mask / 255 (computed from ``post_process_semantic_segmentation`` scores against the
            black/white palette: p = 0.5 + (d_black − d_white) / (6·255²)).
        """
        n = pixel_values.shape[0]
        # 1. SegGPT, the prompt repeated for every query
        inputs = {"pixel_values": pixel_values, **{k: v.repeat(n, 1, 1, 1) for k, v in prompt.items()}}
        outputs = self.run(**inputs, embedding_type=self.embedding_type)
        outputs.pred_masks = outputs.pred_masks.float()
        # 2. back to each query's size, then to a probability
        post = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes, num_labels=1,
                                                                 return_segmentation_scores=True)
        probs = []
        for item in post:
            scores = item.segmentation_scores  # (2, H, W): −squared distance to black, to white
            margin = scores[1] - scores[0]      # d_black − d_white
            probs.append((0.5 + margin / (6.0 * 255.0 ** 2)).clamp(0, 1).float())
        return to_host(probs) if host else probs

    def foreground(self, queries: list[np.ndarray], demo_image: np.ndarray, demo_mask: np.ndarray,
                   host: bool = True) -> list[np.ndarray] | list[torch.Tensor]:
        """Foreground probability of each query for one prompt, both input steps here.

        Args:
            queries: list of (H_i, W_i, 3) uint8 RGB.
            demo_image: (h, w, 3) uint8 RGB; demo_mask: (h, w) bool, the component in ``demo_image``.
            host: NumPy arrays (True) or float32 tensors left on the model's device (False).

        Returns:
            list of (H_i, W_i) float32 in [0, 1], see ``probabilities``.
        """
        ready = [self.input.prepare(q) for q in queries]
        sizes = [(int(r["size"][0]), int(r["size"][1])) for r in ready]
        return self.probabilities(self.pixel_values([r["query"] for r in ready]),
                                  self.prompt(demo_image, demo_mask), sizes, host)
