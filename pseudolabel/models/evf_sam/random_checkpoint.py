"""Random-weight EVF-SAM checkpoints in the published layout, for smoke tests and benchmarks offline.

``write_random_checkpoint(dir, variant, size)`` writes config.json, model.safetensors (original tensor
names) and a sentencepiece XLM-R tokenizer trained on a few sentences with tokenizer_config.json and
special_tokens_map.json (plus added_tokens.json registering ``[semantic]`` for a multitask one) — the same
files a downloaded checkpoint has, so everything downstream runs the real loading code.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from pseudolabel.models.evf_sam.model import MULTITASK_TOKEN, EvfSam, EvfSamConfig, save_evf_sam

_CORPUS = [
    "a zebra standing on the grass", "the red car on the left", "sky above the sea", "a person riding a bike",
    "square circle triangle star", "the dog next to the tree", "[semantic] hair", "[semantic] road and building",
    "two cats sleeping on a sofa", "a blue boat near the shore", "shape object background foreground",
]

#: (BEiT-3 overrides, SAM-H vision/decoder width, SAM input side); BEiT-3 keeps 224² / 16 px (split 197)
SIZES = {
    "tiny": dict(embed_dim=32, layers=2, heads=2, ffn_dim=64, sam_width=32, sam_layers=2, sam_image=64),
    "small": dict(embed_dim=128, layers=4, heads=4, ffn_dim=256, sam_width=96, sam_layers=4, sam_image=256),
}


def random_config(variant: str = "sam", size: str = "tiny", *, multitask: bool | None = None,
                  vocab_size: int = 128) -> EvfSamConfig:
    """An EvfSamConfig of the real architecture at a small size (``SIZES``)."""
    s = SIZES[size]
    w, img = s["sam_width"], s["sam_image"]
    beit = dict(embed_dim=s["embed_dim"], layers=s["layers"], heads=s["heads"], ffn_dim=s["ffn_dim"],
                vocab_size=vocab_size, max_source_positions=64)
    prompt = dict(hidden_size=w, image_size=img, patch_size=16)
    decoder = dict(hidden_size=w, num_hidden_layers=2, num_attention_heads=2, mlp_dim=2 * w, iou_head_hidden_dim=w)
    if variant == "sam":
        vision = dict(hidden_size=w, num_hidden_layers=s["sam_layers"], num_attention_heads=2, mlp_dim=2 * w,
                      output_channels=w, image_size=img, patch_size=16, window_size=2,
                      global_attn_indexes=[s["sam_layers"] - 1], num_pos_feats=w // 2)
        sam = dict(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    elif variant == "sam2":
        dims = [w // 4, w // 2, w, 2 * w]
        backbone = dict(model_type="sam2_hiera_det_model", hidden_size=dims[0], num_attention_heads=1,
                        image_size=[img, img], blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=dims,
                        num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 4],
                        global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2])
        e = img // 16
        vision = dict(backbone_config=backbone, backbone_channel_list=list(reversed(dims)),
                      backbone_feature_sizes=[[4 * e, 4 * e], [2 * e, 2 * e], [e, e]], fpn_hidden_size=w)
        sam = dict(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    raw = dict(sam_variant=variant, hidden_size=s["embed_dim"], out_dim=w, beit3_config=beit, sam_config=sam)
    if multitask is not None:
        raw["multitask"] = multitask
    return EvfSamConfig.from_dict(raw)


_SPECIAL_TOKENS = dict(bos_token="<s>", cls_token="<s>", eos_token="</s>", pad_token="<pad>", sep_token="</s>",
                      unk_token="<unk>", mask_token="<mask>")


def write_tokenizer(path: str | os.PathLike, vocab_size: int = 64, *, multitask: bool = False) -> None:
    """Train a tiny BPE sentencepiece model and save it as ``sentencepiece.bpe.model`` (XLM-R's file), with
    the tokenizer_config.json / special_tokens_map.json the published checkpoints ship; ``multitask``
    also writes added_tokens.json registering ``[semantic]`` after the base vocabulary, as the multitask
    checkpoints do."""
    import sentencepiece as spm

    root = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(_CORPUS * 10))
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(Path(tmp) / "sp"), vocab_size=vocab_size,
                                       model_type="bpe", character_coverage=1.0, hard_vocab_limit=False,
                                       minloglevel=2)
        (root / "sentencepiece.bpe.model").write_bytes((Path(tmp) / "sp.model").read_bytes())
    (root / "special_tokens_map.json").write_text(json.dumps(_SPECIAL_TOKENS, indent=2))
    config = dict(_SPECIAL_TOKENS, tokenizer_class="XLMRobertaTokenizer", padding_side="right", use_fast=False)
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if multitask:
        from transformers import XLMRobertaTokenizer

        base = len(XLMRobertaTokenizer.from_pretrained(str(root)))
        (root / "added_tokens.json").write_text(json.dumps({MULTITASK_TOKEN: base}))


def write_random_checkpoint(path: str | os.PathLike, variant: str = "sam", size: str = "tiny", *,
                            seed: int = 0, multitask: bool | None = None) -> EvfSam:
    """Write a random-weight checkpoint directory; returns the model it holds."""
    torch.manual_seed(seed)
    cfg = random_config(variant, size, multitask=multitask)
    model = EvfSam(cfg).eval()
    # the published checkpoints have a trained no_mask_embed / decoder; random ones give ~zero logits,
    # so spread the weights a little to get masks of varied size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("sam.mask_decoder") and p.dim() >= 2:
                p.mul_(3.0)
    Path(path).mkdir(parents=True, exist_ok=True)
    save_evf_sam(model, path)
    write_tokenizer(path, multitask=bool(multitask))
    return model
