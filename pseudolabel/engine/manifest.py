"""The manifest as a Ray Data source: one read task per manifest part.

Reading the small manifest parts through ``read_parquet`` lets Ray merge them into a single block, and
one block means no parallelism and no streaming output. This source keeps one block per part, and it
is a Read operator, so Ray Data's checkpoint filter (resume, exactly-once) applies to it.
"""
from __future__ import annotations

import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.schemas.tables import MANIFEST_SCHEMA
from pseudolabel.storage import filesystem


def _read_part(uri: str, storage: StorageSpec | None):
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        return [pq.read_table(f, schema=MANIFEST_SCHEMA)]


class ManifestDatasource(Datasource):
    """Yields the manifest parts ``part_uris`` (with ``rows[i]`` rows each) as one block per part."""

    def __init__(self, part_uris: list[str], rows: list[int], storage: StorageSpec | None):
        super().__init__()
        self.part_uris, self.rows, self.storage = part_uris, rows, storage

    def estimate_inmemory_data_size(self) -> int:
        return 256 * sum(self.rows)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        tasks = []
        for uri, n in zip(self.part_uris, self.rows):
            meta = BlockMetadata(num_rows=n, size_bytes=256 * n, input_files=[uri], exec_stats=None)
            tasks.append(ReadTask(lambda uri=uri: _read_part(uri, self.storage), meta, schema=MANIFEST_SCHEMA,
                                  per_task_row_limit=per_task_row_limit))
        return tasks
