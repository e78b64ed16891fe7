"""One category-table builder for the pipeline's summary, reading a run back, exports and evaluation."""
from __future__ import annotations

from pseudolabel.schemas.coco import category_ids, category_table


def test_declared_first_then_annotations_with_new_ids_for_names_without_one():
    declared = [{"id": 2, "name": "cat", "labeler": "evf_sam"}, {"id": 1, "name": "sky", "semantic": True},
                {"id": 2, "name": "dog"}, {"name": "no id: skipped"}]
    anns = [{"category_id": 2, "category": "other name for 2"},
            {"category_id": 7, "category": "tree", "labeler": "iseg"},
            {"category_id": None, "category": "rock"}, {"category_id": None, "category": "cat"},
            {"category_id": None, "category": None}]
    table = category_table(declared, anns)
    assert [(c["id"], c["name"], c["supercategory"], c["semantic"]) for c in table] == [
        (1, "sky", "object", True), (2, "cat", "evf_sam", False), (7, "tree", "iseg", False),
        (8, "rock", "object", False)]
    assert category_ids(table) == {"sky": 1, "cat": 2, "tree": 7, "rock": 8}
    assert category_table([]) == [] and category_ids([]) == {}


def test_the_pipeline_export_and_reader_agree(tmp_path):
    from test_export import write_two_labeler_run

    from pseudolabel.jobs.outputs import labels_io
    from pseudolabel.jobs.outputs.export import category_table_of

    out = write_two_labeler_run(tmp_path / "run")
    rows = labels_io.read_labels(out).to_pylist()
    from_reader = labels_io.categories(out, labels=labels_io.read_labels(out, columns=["annotations"]))
    from_export, by_name = category_table_of(out, None, rows)
    assert from_reader == from_export and by_name == category_ids(from_export)
