"""The offline HTML QA report: page, PNGs that exist and decode, counts, overlays where the masks are."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from labels_fixtures import render_image, shape_masks, write_run
from pseudolabel.jobs.report import category_colour, overlay_masks, overlay_tokens, report


def _imgs(page: str) -> list[str]:
    return re.findall(r"<img src='([^']+)'", page)


def test_report_page_and_pngs(tmp_path):
    out = write_run(tmp_path / "run")
    index = report(out, str(tmp_path / "rep"), sample=24, seed=0)
    assert Path(index) == tmp_path / "rep" / "index.html"
    page = Path(index).read_text()
    # counts, errors with escaped messages, categories
    for label, value in (("images", 4), ("ok", 3), ("error", 1), ("annotations", 5)):
        assert f"<th>{label}</th><td>{value}</td>" in page
    assert "cannot decode image: truncated &lt;file&gt;" in page
    assert "box" in page and "wedge" in page and "images/s" in page
    # offline: no external assets
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)
    srcs = _imgs(page)
    # 3 cards x (image + annotations + tokens + 2 layers)
    assert len(srcs) == 3 * 5
    for s in srcs:
        arr = cv2.imread(str(tmp_path / "rep" / s), cv2.IMREAD_UNCHANGED)
        assert arr is not None and arr.shape[0] > 0
    # the annotation overlay differs from the image inside the masks only
    for k, img_id in enumerate((1, 2, 3)):
        base = cv2.imread(str(tmp_path / "rep" / f"sample_{k:03d}_0.png"))[..., ::-1]
        over = cv2.imread(str(tmp_path / "rep" / f"sample_{k:03d}_1.png"))[..., ::-1]
        assert np.array_equal(base, render_image(img_id))
        changed = (base != over).any(-1)
        fg = np.any(shape_masks(img_id), axis=0)
        assert changed[fg].mean() > 0.95
        near = cv2.dilate(fg.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert not changed[~near].any()
        assert "0.80" in page  # score caption of the first annotation


def test_report_sample_is_seeded_and_missing_sources(tmp_path):
    out = write_run(tmp_path / "run", with_images=False)
    a = Path(report(out, str(tmp_path / "a"), sample=2, seed=3)).read_text()
    b = Path(report(out, str(tmp_path / "b"), sample=2, seed=3)).read_text()
    titles = re.findall(r"<b>([^<]+)</b>", a)
    assert len(titles) == 2 and titles == re.findall(r"<b>([^<]+)</b>", b)
    assert "source image unavailable" in a
    for s in _imgs(a):
        assert cv2.imread(str(tmp_path / "a" / s), cv2.IMREAD_UNCHANGED) is not None


def test_overlay_helpers():
    img = np.zeros((20, 30, 3), np.uint8)
    m = np.zeros((20, 30), bool)
    m[5:15, 5:15] = True
    out = overlay_masks(img, [m], [(255, 0, 0)], alpha=0.5)
    assert out[10, 10, 0] >= 127 and out[10, 10, 1] == 0
    assert (out[0:3, 20:] == 0).all()
    lm = np.zeros((20, 30), np.int32)
    lm[:, 15:] = 2
    lm[:, :15] = 1
    t = overlay_tokens(img, lm)
    assert (t[:, 14] == 255).all() and (t[:, 3] != t[:, 20]).any()
    assert category_colour(1) != category_colour(2) and category_colour(1) == category_colour(1)
