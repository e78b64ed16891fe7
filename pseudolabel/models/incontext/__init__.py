"""In-context separation (SeFM): canvas helpers, the SeFM network, the SegGPT + inpainting path, the labeler.

Submodules are imported on use so that ``canvas`` stays free of torch and transformers.
"""
