"""The trainers (``pseudolabel train-*``): DirectSAM, FOBA and the in-context separator."""
