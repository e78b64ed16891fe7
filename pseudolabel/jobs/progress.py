"""A progress bar for the jobs that read a finished run image by image (evaluate, export, report).

Shown on stderr only when stderr is a terminal (a person at the command line), so scripts, logs and
pipes stay clean and the commands' results on stdout are untouched.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def image_progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """``items`` (``total`` of them), moving a bar ``desc`` in images per second while a terminal watches."""
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit="img", file=sys.stderr, disable=not _is_terminal())


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
