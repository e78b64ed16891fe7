"""The user-facing job kinds around a run, one subpackage each (they use the engine; nothing imports them back):

- ``outputs``: reading a run back (``labels_io``), exports (``export``, ``export_formats``), the report
- ``evaluation``: metrics against ground truth (``evaluate``, ``metrics``, ``directsam_eval``)
- ``training``: the trainers (``directsam``, ``foba``, ``incontext``) on one shared preamble (``common``)
- ``demo``: the synthetic dataset with ground truth (``data``)
"""
