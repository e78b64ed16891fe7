"""The run's progress line, driven by what is committed: labels files as they land in ``labels/``.

    labelled 120/500 [00:14<00:45, 8.3 img/s, errors=3]

A thread on the driver lists ``labels/`` every few seconds, reads the footer and the ``status`` column of
each new file (never the masks), and moves a tqdm bar: images labelled of the images to label, rate,
ETA, error rows. It shows rows as they are written; the rows of a run killed mid-write that Ray drops
on the next run are counted here and relabelled then.
"""
from __future__ import annotations

import sys
import threading

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.storage import filesystem


class CommittedProgress(threading.Thread):
    """Polls ``labels_uri`` every ``interval`` s; ``total`` images to label, ``done`` already labelled."""

    def __init__(self, labels_uri: str, storage: StorageSpec | None, total: int, done: int = 0,
                 interval: float = 2.0, enabled: bool = True):
        super().__init__(daemon=True, name="pseudolabel-progress")
        self.labels_uri, self.storage, self.interval = labels_uri, storage, interval
        self.total, self.done, self.errors = total, done, 0
        self._seen: set[str] = set(self._files())  # an earlier run's files are in ``done`` already
        self._halt = threading.Event()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc="labelled", unit="img", file=sys.stderr,
                             dynamic_ncols=True, postfix={"errors": 0})

    def _files(self) -> list[str]:
        fs, root = filesystem(self.labels_uri, self.storage)
        try:
            return [p for p in fs.find(root) if p.endswith(".parquet")]
        except (FileNotFoundError, OSError):
            return []

    def poll(self) -> None:
        """Count the rows of labels files not seen before."""
        fs, _ = filesystem(self.labels_uri, self.storage)
        rows = errors = 0
        for path in [p for p in self._files() if p not in self._seen]:
            try:
                with fs.open(path, "rb") as f:
                    status = pq.read_table(f, columns=["status"]).column("status")
            except Exception:  # still being written: next time
                continue
            self._seen.add(path)
            rows += len(status)
            errors += pc.sum(pc.equal(status, "error")).as_py() or 0
        if rows:
            self.done += rows
            self.errors += errors
            if self._bar is not None:
                self._bar.update(rows)
                self._bar.set_postfix(errors=self.errors)

    def run(self) -> None:
        # a listing costs one request per thousand files on object stores: poll less often as they grow
        while not self._halt.wait(max(self.interval, len(self._seen) / 500)):
            self.poll()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=30)
        self.poll()
        if self._bar is not None:
            self._bar.close()
