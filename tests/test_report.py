"""The offline HTML QA report: page, PNGs that exist and decode, counts, overlays where the masks are,
worst-first order, per-instance colours, whole-run plots, and the page loading cleanly in a headless
browser."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from labels_fixtures import render_image, shape_masks, write_run

from pseudolabel.jobs.outputs.report import (
    CATEGORIES_PNG,
    SCORES_PNG,
    category_colour,
    instance_colour,
    overlay_masks,
    overlay_tokens,
    report,
    run_stats,
)
from pseudolabel.schemas.tables import LABELS_SCHEMA


def _imgs(page: str) -> list[str]:
    return re.findall(r"<img src=[\"']([^\"']+)[\"']", page)


def _cards(page: str) -> dict[str, str]:
    """image_id -> the HTML of its sample card."""
    parts = re.split(r"(?=<div class=\"card[^\"]*\" data-image-id=)", page)
    return {re.search(r'data-image-id="([^"]*)"', p).group(1): p for p in parts[1:]}


def _card_order(page: str) -> list[str]:
    return re.findall(r'<div class="card[^"]*" data-image-id="([^"]*)"', page)


def _legend(card: str) -> list[tuple[tuple[int, ...], str, str]]:
    """(rgb, category, score) of each legend row of a card."""
    rows = re.findall(r'<span class="sw" style="background:rgb\((\d+),(\d+),(\d+)\)"></span>\d+</td>'
                      r"<td>([^<]*)</td><td>([^<]*)</td>", card)
    return [((int(r), int(g), int(b)), cat, score) for r, g, b, cat, score in rows]


def _rewrite_run(out: str, edit) -> None:
    """Apply ``edit(row) -> row`` to every row of the run's labels files, in place."""
    for f in sorted((Path(out) / "labels").glob("part-*.parquet")):
        rows = [edit(r) for r in pq.read_table(f).to_pylist()]
        pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), f)


def test_report_page_and_pngs(tmp_path):
    out = write_run(tmp_path / "run")
    index = report(out, str(tmp_path / "rep"), sample=24, seed=0)
    assert Path(index) == tmp_path / "rep" / "index.html"
    page = Path(index).read_text()
    # counts, errors with escaped messages, categories
    for label, value in (("images", 4), ("ok", 3), ("error", 1), ("annotations", 5)):
        assert f"<th>{label}</th><td>{value}</td>" in page
    assert "cannot decode image: truncated &lt;file&gt;" in page and "<file>" not in page
    assert "box" in page and "wedge" in page and "images/s" in page
    # offline: no external assets
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)
    srcs = _imgs(page)
    # 2 whole-run plots + 3 cards x (image + annotations + tokens + 2 layers); the error card has no image
    assert srcs[:2] == [SCORES_PNG, CATEGORIES_PNG]
    assert len(srcs) == 2 + 3 * 5 and len(set(srcs)) == len(srcs)
    for s in srcs:
        arr = cv2.imread(str(tmp_path / "rep" / s), cv2.IMREAD_UNCHANGED)
        assert arr is not None and arr.shape[0] > 0
    cards = _cards(page)
    assert _card_order(page) == ["bad-1", "1", "2", "3"]  # error first; 1 and 2 tie on scores -> image id
    assert "error" in cards["bad-1"] and "<img" not in cards["bad-1"]
    # the annotation overlay differs from the image inside the masks only
    for img_id in (1, 2, 3):
        views = _imgs(cards[str(img_id)])
        base = cv2.imread(str(tmp_path / "rep" / views[0]))[..., ::-1]
        over = cv2.imread(str(tmp_path / "rep" / views[1]))[..., ::-1]
        assert np.array_equal(base, render_image(img_id))
        changed = (base != over).any(-1)
        fg = np.any(shape_masks(img_id), axis=0)
        assert changed[fg].mean() > 0.95
        near = cv2.dilate(fg.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert not changed[~near].any()
    assert [(c, s) for _, c, s in _legend(cards["1"])] == [("box", "0.80"), ("disc", "0.70")]
    assert "lowest score 0.70, mean 0.75" in cards["1"]
    # whole-run category counts in the table
    assert re.search(r"box</td><td>test</td><td class=\"num\">2</td>", page)
    assert re.search(r"wedge</td><td>test</td><td class=\"num\">1</td>", page)


def test_report_sample_is_seeded_and_missing_sources(tmp_path):
    out = write_run(tmp_path / "run", with_images=False)
    a = Path(report(out, str(tmp_path / "a"), sample=2, seed=3)).read_text()
    b = Path(report(out, str(tmp_path / "b"), sample=2, seed=3)).read_text()
    titles = re.findall(r"<b>([^<]+)</b>", a)
    assert len(titles) == 2 and titles == re.findall(r"<b>([^<]+)</b>", b)
    assert _card_order(a) == _card_order(b)
    ok_cards = [c for i, c in _cards(a).items() if i != "bad-1"]
    assert ok_cards and all("source image unavailable" in c for c in ok_cards)
    for s in _imgs(a):
        assert cv2.imread(str(tmp_path / "a" / s), cv2.IMREAD_UNCHANGED) is not None


def test_report_order_instance_colours_plots_and_escaping(tmp_path):
    out = write_run(tmp_path / "run")

    def edit(r):
        anns = r["annotations"]
        if r["image_id"] == "1":  # no scored instance -> after every scored image
            for a in anns:
                a["score"] = None
            r["file_name"] = "<i>odd</i> & \"name\""
        elif r["image_id"] == "2":  # lowest 0.5, mean 0.725; both instances of one category
            for a, s in zip(anns, (0.95, 0.5)):
                a.update(score=s, category_id=2, category="disc")
        elif r["image_id"] == "3":  # lowest 0.5, mean 0.5 -> before image 2
            anns[0]["score"] = 0.5
        return r

    _rewrite_run(out, edit)
    stats = run_stats(out)
    assert stats["annotations"] == 5 and stats["counts"] == {1: 2, 2: 3}
    assert np.allclose(np.sort(stats["scores"]["test"]), [0.5, 0.5, 0.95])

    page = Path(report(out, str(tmp_path / "rep"), sample=24)).read_text()
    assert _card_order(page) == ["bad-1", "3", "2", "1"]
    cards = _cards(page)
    assert "no scored instances" in cards["1"] and "lowest score 0.50, mean 0.72" in cards["2"]
    # autoescaped text
    assert "&lt;i&gt;odd&lt;/i&gt; &amp; &#34;name&#34;" in page and "<i>odd</i>" not in page
    # a distinct colour per instance, the category in the legend; the overlay uses the legend's colours
    legend = _legend(cards["2"])
    assert [(c, s) for _, c, s in legend] == [("disc", "0.95"), ("disc", "0.50")]
    assert legend[0][0] != legend[1][0] and [rgb for rgb, _, _ in legend] == [instance_colour(0), instance_colour(1)]
    views = _imgs(cards["2"])
    base = cv2.imread(str(tmp_path / "rep" / views[0]))[..., ::-1].astype(np.float32)
    over = cv2.imread(str(tmp_path / "rep" / views[1]))[..., ::-1].astype(np.float32)
    for (y, x), (rgb, _, _) in zip(((18, 55), (45, 25)), legend):  # inside the rect (0.95) and the wedge (0.5)
        assert np.abs(over[y, x] - (0.55 * base[y, x] + 0.45 * np.asarray(rgb))).max() <= 2
    # whole-run plots, not only the sample's: a 1-image sample still counts every instance
    small = Path(report(out, str(tmp_path / "small"), sample=1)).read_text()
    assert len(_card_order(small)) == 1
    assert re.search(r"disc</td><td>test</td><td class=\"num\">3</td>", small)
    assert "3 scored instances of 5 in 4 images" in small
    for name in (SCORES_PNG, CATEGORIES_PNG):
        arr = cv2.imread(str(tmp_path / "small" / name))
        assert arr is not None and arr.shape[0] > 100 and arr.shape[1] > 300 and arr.std() > 10


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _dump_dom(browser: str, index: Path, profile: Path) -> str:
    """The page's DOM after load, as rendered by the headless browser."""
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--no-default-browser-check", f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
           index.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "<body" in res.stdout, \
        f"{browser} failed (rc {res.returncode}): {res.stderr[-2000:]}"
    return res.stdout


def _load_marks(dom: str) -> tuple[str | None, str | None]:
    body = re.search(r"<body([^>]*)>", dom).group(1)
    ok = re.search(r'data-images-ok="([^"]*)"', body)
    err = re.search(r'data-errors="([^"]*)"', body)
    return (ok.group(1) if ok else None), (err.group(1) if err else None)


def test_report_loads_in_headless_browser(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: chromium is not installed (Debian: apt-get install chromium; "
                    ".ci/run installs it)")
    out = write_run(tmp_path / "run")
    index = Path(report(out, str(tmp_path / "rep"), sample=24))
    n = len(_imgs(index.read_text()))
    assert n == 2 + 3 * 5
    dom = _dump_dom(browser, index, tmp_path / "profile")
    images_ok, errors = _load_marks(dom)
    assert images_ok == f"{n}/{n}", f"images loaded: {images_ok}; errors: {errors}"
    assert errors == "", errors
    assert "<file>" not in dom and "truncated &lt;file&gt;" in dom  # the error message stayed text
    assert re.search(r'id="load-status"[^>]*hidden', dom)
    # the check itself notices a missing image
    (index.parent / "sample_002_1.png").unlink()
    images_ok, errors = _load_marks(_dump_dom(browser, index, tmp_path / "profile"))
    assert images_ok == f"{n - 1}/{n}" and "sample_002_1.png" in errors


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
    colours = [instance_colour(k) for k in range(19)]
    near = min(np.abs(np.subtract(a, b)).max() for i, a in enumerate(colours) for b in colours[i + 1:])
    assert near >= 20 and instance_colour(3) == instance_colour(3)
    assert len({instance_colour(k) for k in range(200)}) == 200
