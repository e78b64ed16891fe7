"""Image-level tags for iSeg rows that bring none: CLIP zero-shot over the job's ontology.

The iSeg reference prompts only the classes an image is tagged with: ground-truth image labels in its
weakly-supervised runs, a CLIP classifier's (TagCLIP) in its open-vocabulary runs. This module is the
second source for rows without ``categories``: a ``transformers`` CLIPModel loaded with
``from_pretrained`` scores the image against the ontology.

Scoring follows the reference's classifier where a global CLIP can:
1. text features per class: the mean of the L2-normalised embeddings of every (template, prompt)
   pair, re-normalised (the reference's prompt ensemble; its 85 templates are ``REFERENCE_TEMPLATES``);
2. the image's L2-normalised embedding against the classes and the background distractor words
   (``BACKGROUND_WORDS``, the reference's COCO background categories), softmax of
   ``logit_scale * cosine``;
3. the ontology classes' probabilities; tags are the classes above ``min + threshold * (max - min)``
   of that row (``pick_tags``; the reference's relative rule, 0.6 on COCO and VOC), never none.
The reference's TagCLIP adds local patch votes and a crop re-score that a stock CLIPModel lacks.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

#: the reference classifier's prompt ensemble (ImageNet-style templates)
REFERENCE_TEMPLATES = [
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.', 'there is a {} in the scene.',
    'there is the {} in the scene.', 'this is a {} in the scene.', 'this is the {} in the scene.',
    'this is one {} in the scene.',
]

#: the reference classifier's background categories for COCO (scored with the classes, never tags)
BACKGROUND_WORDS = ['ground', 'land', 'grass', 'tree', 'building', 'wall', 'sky', 'lake', 'water', 'river',
                    'sea', 'railway', 'railroad', 'helmet', 'cloud', 'house', 'mountain', 'ocean', 'road', 'rock',
                    'street', 'valley', 'bridge']


class TagParams(BaseModel):
    """The ``tags`` step of iseg: CLIP zero-shot tags for rows without ``categories``."""

    model_config = ConfigDict(extra="forbid")

    weights: str = Field(description="CLIP checkpoint (hub id, local directory or s3:// prefix) with its "
                                     "tokenizer and image processor")
    revision: str | None = None
    threshold: float = Field(0.6, ge=0, le=1, description="tags: classes above min + threshold * (max - min) "
                                                          "of the row's class probabilities (0.6: the "
                                                          "reference's COCO/VOC)")
    templates: list[str] | None = Field(None, description="prompt templates with one '{}' (None: the reference's 85)")
    background_words: list[str] = Field(default_factory=lambda: list(BACKGROUND_WORDS),
                                        description="distractor classes in the softmax, never tags")


def pick_tags(scores: np.ndarray, threshold: float) -> list[int]:
    """(C,) class scores -> indices k with ``scores[k] > min + threshold * (max - min)``, in index order.

    When none passes (all equal), the argmax alone. An empty ``scores`` gives [].
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return []
    cut = s.min() + threshold * (s.max() - s.min())
    keep = [int(k) for k in np.flatnonzero(s > cut)]
    return keep or [int(s.argmax())]


class ClipTagger:
    """CLIP zero-shot scores of images against a fixed class list.

    ``scores(images)``: list of (H, W, 3) uint8 RGB -> (B, C) float32 softmax probabilities of the
    ontology classes (the background distractors take the rest of the mass).
    """

    def __init__(self, params: TagParams, class_prompts: list[list[str]], storage=None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        from pseudolabel.models.weights import resolve_weights

        root = resolve_weights(params.weights, storage, params.revision)
        self.params = params
        self.device = device
        self.model = CLIPModel.from_pretrained(root, torch_dtype=dtype).to(device).eval()  # type: ignore[arg-type]  # transformers types .to() as an unbound wrapper
        self.tokenizer = CLIPTokenizer.from_pretrained(root)
        self.processor = CLIPImageProcessor.from_pretrained(root)
        self.n_classes = len(class_prompts)
        with torch.inference_mode():
            groups = [list(p) for p in class_prompts] + [[w] for w in params.background_words]
            self.text_features = torch.stack([self._class_feature(g) for g in groups])  # (C + bg, D)

    def _class_feature(self, prompts: list[str]) -> torch.Tensor:
        templates = self.params.templates or REFERENCE_TEMPLATES
        texts = [t.format(p) for p in prompts for t in templates]
        ids = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        emb = self._features(self.model.get_text_features(**ids)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        return mean / mean.norm()

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers returns a tensor, or (newer releases) an output object holding the projection
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def scores(self, images: list[np.ndarray]) -> torch.Tensor:
        if not images:
            return torch.zeros((0, self.n_classes))
        pixels = self.processor(images=[np.ascontiguousarray(im[..., :3]) for im in images],
                                return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=self.device, dtype=next(self.model.parameters()).dtype)
        img = self._features(self.model.get_image_features(pixel_values=pixels)).float()
        img = img / img.norm(dim=-1, keepdim=True)
        logits = self.model.logit_scale.exp().float() * img @ self.text_features.T
        return logits.softmax(-1)[:, : self.n_classes]

    def tags(self, images: list[np.ndarray]) -> list[list[int]]:
        """Per image, the tagged class indices (``pick_tags`` of its scores)."""
        with torch.inference_mode():
            probs = self.scores(images).cpu().numpy()
        return [pick_tags(row, self.params.threshold) for row in probs]
