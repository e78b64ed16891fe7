"""The synthetic demo dataset: images with exact ground truth (COCO instances, panoptic, boundaries)."""
