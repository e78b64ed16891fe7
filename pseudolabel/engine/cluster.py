"""Connect to Ray: a local cluster by default, ``--address`` / ``RAY_ADDRESS`` for a real one."""
from __future__ import annotations

import logging
import os


def connect(address: str | None = None, min_cpus: float = 0, verbose: bool = False) -> None:
    """Start or join Ray once per process (a no-op when already connected).

    A local cluster advertises at least ``min_cpus`` logical CPUs (never fewer than the machine's cores),
    so a job sized for a small machine is scheduled instead of waiting forever for a free CPU. Unless
    ``verbose``, Ray's start-up notices (token authentication, progress-bar hints) stay quiet; warnings
    from workers and errors still show.
    """
    import ray

    if ray.is_initialized():
        return
    if not verbose:
        for name in ("ray._private.authentication", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        import math

        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus)), **kwargs)
