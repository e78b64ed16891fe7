"""EVF-SAM (hustvl/EVF-SAM): text-prompted segmentation by BEiT-3 early fusion on SAM / SAM-2.

Modules: ``beit3`` (multiway encoder, original names), ``sam`` (transformers towers + key mapping),
``model`` (EvfSam + checkpoint I/O), ``preprocess`` / ``postprocess`` (pure transforms), ``labeler``.
"""
