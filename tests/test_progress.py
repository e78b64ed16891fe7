"""The progress line counts committed rows and error rows from the labels files, once each."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pseudolabel.engine.progress import CommittedProgress


def _write(folder, name, statuses):
    pq.write_table(pa.table({"status": statuses, "image_id": [str(i) for i in range(len(statuses))]}),
                   folder / name)


def test_counts_new_files_once_and_leaves_earlier_runs_out(tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    _write(labels, "earlier.parquet", ["ok"] * 5)  # a previous run's rows: already in ``done``
    bar = CommittedProgress(str(labels), None, total=20, done=5, enabled=True)
    _write(labels, "a.parquet", ["ok", "error", "ok"])
    bar.poll()
    assert (bar.done, bar.errors) == (8, 1)
    bar.poll()  # nothing new
    assert (bar.done, bar.errors) == (8, 1)
    _write(labels, "b.parquet", ["error", "error"])
    (labels / "c.parquet").write_bytes(b"PAR1 half written")  # not readable yet: counted later
    bar.stop()
    assert (bar.done, bar.errors) == (10, 3)
    assert "10/20" in capsys.readouterr().err


def test_renders_done_total_rate_and_errors(tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    bar = CommittedProgress(str(labels), None, total=4, done=0, enabled=True)
    _write(labels, "a.parquet", ["ok", "ok", "error", "ok"])
    bar.stop()
    err = capsys.readouterr().err
    assert "labelled" in err and "4/4" in err and "errors=1" in err and "img/s" in err


def test_missing_folder_and_disabled_bar_are_quiet(tmp_path, capsys):
    bar = CommittedProgress(str(tmp_path / "nothing-yet"), None, total=3, enabled=False)
    bar.start()
    bar.stop()
    assert bar.done == 0 and capsys.readouterr().err == ""
