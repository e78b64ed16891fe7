"""``coco``: a COCO JSON (``input.coco_json``) and the image root ``input.uri``.

Ids and file names come from the JSON; the JSON's boxes become per-row prompts
(``{"boxes_xyxy": [...], "categories": [...]}``). Every ``file_name`` is resolved under the root and
refused otherwise (absolute paths, ``..``, ``/otherbucket/key``, a local symlink leading out): such a
row is an error row, with one message whether or not the file exists, and nothing outside is read.
File names are taken as listed, hidden or not (the JSON names them on purpose).
"""
from __future__ import annotations

import json

from pseudolabel.engine.formats.base import InputFormat, SourceError, confine, error_row, is_local, local_problem
from pseudolabel.engine.formats.folder import fetch_plain
from pseudolabel.storage import read_bytes, to_uri


class CocoFormat(InputFormat):
    name = "coco"
    needs_files = False

    @classmethod
    def claims(cls, spec, files) -> bool:
        return bool(spec.coco_json)

    def list(self, spec, storage, fs, root, files):
        if not spec.coco_json:
            raise SourceError("input.coco_json is required when input.format is 'coco'")
        try:
            coco = json.loads(read_bytes(spec.coco_json, storage))
            images = sorted(coco.get("images", []), key=lambda im: im["id"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SourceError(f"input.coco_json: not a COCO JSON ({type(e).__name__}: {e})") from None
        by_image: dict[int, list[dict]] = {}
        for ann in coco.get("annotations", []):
            by_image.setdefault(ann["image_id"], []).append(ann)
        names = {c["id"]: c["name"] for c in coco.get("categories", [])}
        root_uri = to_uri(fs, root)
        rows = []
        for img in images:
            name = img.get("file_name")
            try:
                path = confine(root, name)
            except SourceError as e:
                rows.append(error_row(str(img["id"]), root_uri, str(name), 0, str(e)))
                continue
            problem = local_problem(path, root) if is_local(fs) else None
            if problem:
                rows.append(error_row(str(img["id"]), root_uri, name, 0, problem))
                continue
            anns = by_image.get(img["id"], [])
            prompts = None
            if anns:
                boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                         for a in anns]
                prompts = json.dumps({"boxes_xyxy": boxes, "categories": [names.get(a["category_id"]) for a in anns]})
            rows.append(dict(image_id=str(img["id"]), uri=to_uri(fs, path), member=None, shard=0, size=None,
                             file_name=name, prompts=prompts, error=None))
        return rows

    def fetch(self, fs, path, rows, image_column=None):
        return fetch_plain(fs, path, rows)
