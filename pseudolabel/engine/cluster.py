"""Connect to Ray: a local cluster by default, ``--address`` / ``RAY_ADDRESS`` for a real one."""
from __future__ import annotations

import logging
import os


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process (a no-op when already connected)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
