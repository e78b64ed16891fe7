"""The public-weights path: SegGPT finds the demonstrated component in the query, inpainting removes it.

1. demo mask = where demo in and demo out differ (``component.difference_mask``);
2. transformers' ``SegGptForImageSegmentation`` segments the same component in each query from the
   prompt (demo in, demo mask): SegGPT paints the query's mask in the lower half of its
   [prompt; query] canvas; several demonstration pairs are run one by one and their foreground
   probabilities averaged;
3. the query is inpainted inside the (dilated) mask: OpenCV by default, a diffusers inpainting pipeline
   when one is given (``pseudolabel.models.inpainting``).

Weights: any SegGPT checkpoint in the transformers layout (e.g. the hub's ``BAAI/seggpt-vit-large``,
a local directory or an s3:// prefix resolved to one) with its ``SegGptImageProcessor``.
"""
from __future__ import annotations

import numpy as np
import torch

from pseudolabel.models.device import compiled, to_host


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
        self.model = SegGptForImageSegmentation.from_pretrained(weights, torch_dtype=dtype, use_safetensors=True)
        # transformers' wrapper around Module.to hides its signature from type checkers
        self.model.to(device).eval()  # type: ignore[arg-type]
        self.run = compiled(self.model, compile, "incontext")
        self.device, self.dtype, self.embedding_type = device, dtype, embedding_type

    @torch.inference_mode()
    def foreground(self, queries: list[np.ndarray], demo_image: np.ndarray, demo_mask: np.ndarray,
                   host: bool = True) -> list[np.ndarray] | list[torch.Tensor]:
        """Foreground probability of each query for one prompt.

        Args:
            queries: list of (H_i, W_i, 3) uint8 RGB.
            demo_image: (h, w, 3) uint8 RGB; demo_mask: (h, w) bool, the component in ``demo_image``.
            host: NumPy arrays (True) or float32 tensors left on the model's device (False).

        Returns:
            list of (H_i, W_i) float32 in [0, 1] (arrays or tensors, see ``host``): the grey level of
            SegGPT's painted mask / 255 (computed from ``post_process_semantic_segmentation`` scores against the
            black/white palette: p = 0.5 + (d_black − d_white) / (6·255²)).
        """
        n = len(queries)
        # 1. preprocess: the mask as a 1-label segmentation map (palette: 0 black, 1 white)
        batch = self.processor.preprocess(images=list(queries), prompt_images=[demo_image] * n,
                                          prompt_masks=[demo_mask.astype(np.uint8)] * n, num_labels=1,
                                          return_tensors="pt")
        inputs = {k: v.to(self.device, self.dtype) for k, v in batch.items()}
        # 2. SegGPT
        outputs = self.run(**inputs, embedding_type=self.embedding_type)
        outputs.pred_masks = outputs.pred_masks.float()
        # 3. back to each query's size, then to a probability
        sizes = [q.shape[:2] for q in queries]
        post = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes, num_labels=1,
                                                                 return_segmentation_scores=True)
        probs = []
        for item in post:
            scores = item.segmentation_scores  # (2, H, W): −squared distance to black, to white
            margin = scores[1] - scores[0]      # d_black − d_white
            probs.append((0.5 + margin / (6.0 * 255.0 ** 2)).clamp(0, 1).float())
        return to_host(probs) if host else probs
