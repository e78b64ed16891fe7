"""Metrics of a run against ground truth (COCO AP, boundary and token metrics)."""
