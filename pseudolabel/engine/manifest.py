"""The manifest as a Ray Data source: one read task per manifest part, small blocks.

Reading the small manifest parts through ``read_parquet`` lets Ray merge them into a single block, and
one block means no parallelism and no streaming output. This source reads each part in its own task
and hands it on in blocks of at most ``block_rows`` rows, so the next stage's tasks (and the write that
commits their labels) each take one small batch, whatever the size of a part. It is a Read operator,
so Ray Data's checkpoint filter (resume, exactly-once) applies to it.
"""
from __future__ import annotations

import functools

import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.schemas.tables import MANIFEST_SCHEMA
from pseudolabel.storage import filesystem


def _read_part(uri: str, storage: StorageSpec | None, block_rows: int):
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, schema=MANIFEST_SCHEMA)
    return [table.slice(start, block_rows) for start in range(0, max(table.num_rows, 1), block_rows)]


class ManifestDatasource(Datasource):
    """Yields the manifest parts ``part_uris`` (with ``rows[i]`` rows each) in blocks of ``block_rows``."""

    def __init__(self, part_uris: list[str], rows: list[int], storage: StorageSpec | None, block_rows: int = 16):
        super().__init__()
        self.part_uris, self.rows, self.storage, self.block_rows = part_uris, rows, storage, block_rows

    def estimate_inmemory_data_size(self) -> int:
        return 256 * sum(self.rows)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        tasks = []
        for uri, n in zip(self.part_uris, self.rows):
            meta = BlockMetadata(num_rows=n, size_bytes=256 * n, input_files=(uri,), exec_stats=None)
            read = functools.partial(_read_part, uri, self.storage, self.block_rows)
            tasks.append(ReadTask(read, meta, schema=MANIFEST_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks
