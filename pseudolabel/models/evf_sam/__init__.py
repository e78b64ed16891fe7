"""EVF-SAM (hustvl/EVF-SAM): text-prompted segmentation by BEiT-3 early fusion on SAM / SAM-2.

Modules: ``beit3`` (multiway encoder, original names), ``sam`` (transformers towers + key mapping),
``model`` (EvfSam + checkpoint I/O), ``preprocess`` / ``postprocess`` (pure transforms), ``labeler``.

Reference: hustvl/EVF-SAM at 9935dc52571678b806830821b3ddeacb30e7af07 (its model code unchanged since
9d00853, which added the multitask checkpoints; the original EVF-SAM2 path follows 781bee0, the revision
before it). Where this departs from it is said in ``sam`` (one SAM-H decoder setting that transformers'
defaults get wrong, set to the reference's), ``model`` (multitask read from the checkpoint's files) and
``labeler`` (batching).
"""
