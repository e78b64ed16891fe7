"""Visual QA report of a finished run: one offline HTML page plus PNG files next to it.

``report(output_uri, out_dir)`` writes ``out_dir/index.html`` (built from the jinja2 template
``templates/report.html.j2`` with autoescaping; no external assets: inline CSS, images referenced by
relative file name) with

1. the run summary: images / ok / error counts, annotations, seconds, images/s, run id, labelers;
2. whole-run plots (matplotlib PNGs): the histogram of every instance score and the instance count per
   category, plus a category table with the same counts;
3. the error rows with their messages;
4. a seeded random sample of the run's images (``ok`` and error rows alike), ordered worst first:
   error rows, then by the image's **lowest** instance score ascending (ties: mean score, then
   image id), then images with no scored instance. Each card shows the image; its annotations
   overlaid with a distinct colour per instance (semi-transparent fill, outline) and a legend giving
   each instance's category, score and labeler; its subobject tokens as a random-colour label map
   with white boundaries; its layers as thumbnails. An error card shows the status and message.

Source images are read back from each row's ``uri``/``member`` (plain file, tar member, Parquet row);
when the source can no longer be read the overlays are drawn on a grey canvas and the card says so.
The page carries a small load check: once loaded, ``<body data-images-ok="loaded/total">`` and
``data-errors`` (resources that failed to load, script errors), and a visible warning when an image
is missing.
"""
from __future__ import annotations

import colorsys
import io
import random
from collections import Counter
from datetime import datetime, timezone

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pseudolabel import storage as st
from pseudolabel.imageio import ImageError, decode_png, encode_png, to_uint8
from pseudolabel.jobs.evaluation.metrics import label_boundaries
from pseudolabel.jobs.outputs.labels_io import (
    _labels_files,
    load_image,
    read_labels,
    read_summary,
    rles_to_label_map,
    run_source,
)
from pseudolabel.jobs.outputs.labels_io import categories as run_categories
from pseudolabel.schemas.coco import rle_to_mask
from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.schemas.tables import STATUS_OK

MAX_SIDE = 384  # longest side of the images shown in the grid
THUMB_SIDE = 128  # longest side of layer thumbnails
MAX_ERRORS_SHOWN = 500
MAX_LEGEND = 40  # instances listed per card (all are drawn)
MAX_PLOT_CATEGORIES = 30  # bars in the per-category plot (the most frequent)
SCORES_PNG = "plot_scores.png"
CATEGORIES_PNG = "plot_categories.png"
TEMPLATE = "report.html.j2"
ORDER_NOTE = ("Ordered worst first: error rows, then by the image's lowest instance score ascending (ties: mean "
              "score, then image id), then images with no scored instance. Colours are per instance; the "
              "legend under each image gives the instance's category.")


# ----------------------------------------------------------------------------- drawing (pure)

def category_colour(category_id: int) -> tuple[int, int, int]:
    """A stable, saturated RGB colour for a category id (golden-angle hues)."""
    h = (int(category_id) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


# Kelly's colours of maximum contrast (white, black and grey left out), in his order
_INSTANCE_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)) for h in (
        "F3C300 875692 F38400 A1CAF1 BE0032 C2B280 008856 E68FAC 0067A5 F99379 604E97 F6A600 B3446C DCD300 "
        "882D17 8DB600 654522 E25822 2B3D26").split())


def instance_colour(k: int) -> tuple[int, int, int]:
    """A distinct RGB colour for the ``k``-th instance of an image (0-based): Kelly's contrast palette for
    the first 19, then golden-angle hues with alternating saturation and brightness."""
    k = int(k)
    if k < len(_INSTANCE_PALETTE):
        return _INSTANCE_PALETTE[k]
    h = (0.11 + k * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, (0.9, 0.55)[k % 2], (0.95, 0.7)[(k // 2) % 2])
    return int(r * 255), int(g * 255), int(b * 255)


def overlay_masks(image: np.ndarray, masks: list[np.ndarray], colours: list[tuple[int, int, int]],
                  alpha: float = 0.45) -> np.ndarray:
    """Blend masks onto an image and outline them.

    Args:
        image: (H, W, 3) uint8 RGB.
        masks: (H, W) bool each, drawn in order (later on top).
        colours: one RGB tuple per mask.
        alpha: fill opacity in [0, 1].

    Returns:
        (H, W, 3) uint8 RGB.
    """
    out = image.astype(np.float32)
    for m, c in zip(masks, colours):
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(c, np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    thickness = max(1, round(max(image.shape[:2]) / 300))
    for m, c in zip(masks, colours):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(v) for v in c), thickness)
    return out


def overlay_tokens(image: np.ndarray, label_map: np.ndarray, seed: int = 0, alpha: float = 0.55) -> np.ndarray:
    """Random-colour label map over an image with white token boundaries; label 0 stays uncoloured.

    Args:
        image: (H, W, 3) uint8 RGB.
        label_map: (H, W) int, 0 = no token.
    """
    n = int(label_map.max()) if label_map.size else 0
    palette = np.random.default_rng(seed).integers(40, 256, (n + 1, 3)).astype(np.float32)
    out = image.astype(np.float32)
    hit = label_map > 0
    out[hit] = (1 - alpha) * out[hit] + alpha * palette[label_map[hit]]
    out = out.clip(0, 255).astype(np.uint8)
    out[label_boundaries(label_map)] = 255
    return out


def _fit(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = side / max(h, w)
    if s >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _png(img: np.ndarray) -> bytes:
    """(H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 -> PNG bytes."""
    return encode_png(img)


def _decode_layer(data: bytes) -> np.ndarray | None:
    """A layer's PNG -> uint8 array as stored ((H, W), RGB or RGBA); 16-bit scaled to 8; None if unreadable."""
    try:
        return to_uint8(decode_png(data))
    except ImageError:
        return None


# ----------------------------------------------------------------------------- whole-run statistics

def run_stats(output_uri: str, storage: StorageSpec | None = None, batch_size: int = 1024) -> dict:
    """Instance statistics of every row of a run, read in batches of the ``annotations`` column.

    Returns:
        ``{"annotations": int, "scores": {labeler: float32 array of the scored instances},
        "counts": {category_id: instances}, "names": {category_id: category name seen}}``
        (``None`` keys for a missing labeler or category id).
    """
    files, afs = _labels_files(str(output_uri), storage)
    scores: dict = {}
    counts: Counter = Counter()
    names: dict = {}
    n = 0
    if files:
        dataset = ds.dataset(files, format="parquet", filesystem=afs)
        for batch in dataset.to_batches(columns=["annotations"], batch_size=batch_size):
            flat = pc.list_flatten(batch.column(0))
            if not len(flat):
                continue
            n += len(flat)
            cid, cname = pc.struct_field(flat, "category_id"), pc.struct_field(flat, "category")
            grouped = pa.table({"c": cid, "n": cname}).group_by(["c", "n"]).aggregate([([], "count_all")])
            for c, name, k in zip(*(grouped.column(x).to_pylist() for x in ("c", "n", "count_all"))):
                counts[c] += k
                if name is not None:
                    names.setdefault(c, name)
            score = pc.struct_field(flat, "score").to_numpy(zero_copy_only=False).astype(np.float32)
            lab = pc.struct_field(flat, "labeler").dictionary_encode()
            idx = pc.fill_null(lab.indices, -1).to_numpy(zero_copy_only=False)
            for j, name in [(-1, None)] + list(enumerate(lab.dictionary.to_pylist())):
                s = score[(idx == j) & ~np.isnan(score)]
                if len(s):
                    scores.setdefault(name, []).append(s)
    return {"annotations": n, "counts": dict(counts), "names": names,
            "scores": {k: np.concatenate(v) for k, v in scores.items()}}


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def plot_scores(scores: dict) -> bytes:
    """PNG histogram of instance scores (``{labeler: scores}``, stacked by labeler when several)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.8, 3.2), layout="constrained")
    ax = fig.subplots()
    labs = sorted(scores, key=lambda x: (x is None, str(x)))
    data = [scores[x] for x in labs]
    total = sum(len(d) for d in data)
    if total:
        lo, hi = float(min(d.min() for d in data)), float(max(d.max() for d in data))
        bins: int | list[float] = np.linspace(0.0, 1.0, 21).tolist() if lo >= 0.0 and hi <= 1.0 else 20
        ax.hist(data, bins=bins, stacked=True, label=[str(x) if x is not None else "(no labeler)" for x in labs],
                edgecolor="white", linewidth=0.5)
        if len(labs) > 1:
            ax.legend(fontsize=8, title="labeler", title_fontsize=8)
    else:
        ax.text(0.5, 0.5, "no scored instances", ha="center", va="center", transform=ax.transAxes)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("instance score")
    ax.set_ylabel("instances")
    ax.set_title(f"Instance scores, whole run ({total} scored)", fontsize=11)
    return _figure_png(fig)


def plot_categories(rows: list[dict]) -> bytes:
    """PNG horizontal bar chart of instances per category (``rows``: dicts with id, name, count),
    the ``MAX_PLOT_CATEGORIES`` most frequent, bars in the category colours."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    top = sorted(rows, key=lambda r: (-r["count"], str(r["id"])))[:MAX_PLOT_CATEGORIES]
    fig = Figure(figsize=(5.8, max(2.4, 0.9 + 0.26 * len(top))), layout="constrained")
    ax = fig.subplots()
    if top:
        y = np.arange(len(top))
        ax.barh(y, [r["count"] for r in top], color=[np.asarray(category_colour(r["id"] or 0)) / 255 for r in top],
                edgecolor="#555", linewidth=0.5)
        ax.set_yticks(y, [f"{r['name']} ({r['id']})" for r in top], fontsize=8)
        ax.invert_yaxis()
        for yi, r in zip(y, top):
            ax.annotate(str(r["count"]), (r["count"], yi), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=8)
        ax.margins(x=0.12)
    else:
        ax.text(0.5, 0.5, "no categories", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("instances")
    more = f", top {len(top)} of {len(rows)}" if len(rows) > len(top) else ""
    ax.set_title(f"Instances per category, whole run{more}", fontsize=11)
    return _figure_png(fig)


# ----------------------------------------------------------------------------- page pieces

def _fmt(v, digits: int = 2):
    return f"{v:.{digits}f}" if isinstance(v, float) else v


def _rgb(c: tuple[int, int, int]) -> str:
    return f"rgb({c[0]},{c[1]},{c[2]})"


def _scores(row: dict) -> list[float]:
    return [float(a["score"]) for a in row.get("annotations") or [] if a.get("score") is not None]


def sort_key(row: dict) -> tuple:
    """Worst first: error rows, then the image's lowest instance score ascending (ties: mean score,
    then image id), then images with no scored instance."""
    iid = str(row["image_id"])
    if row["status"] != STATUS_OK:
        return (0, 0.0, 0.0, iid)
    s = _scores(row)
    if not s:
        return (2, 0.0, 0.0, iid)
    return (1, min(s), sum(s) / len(s), iid)


def _error_card(row: dict) -> dict:
    return {"image_id": row["image_id"], "title": row.get("file_name") or row["uri"],
            "size": "", "score_note": "error", "status": row["status"], "error": row.get("error") or "",
            "note": (f"source: {row['uri']}" + (f" :: {row['member']}" if row.get("member") else "")),
            "views": [], "legend": [], "legend_more": 0, "layers": []}


def _card(k: int, row: dict, out_dir: str, storage, cat_names: dict, seed: int, source: dict | None = None) -> dict:
    """Write one sample's PNGs and return its card's template context."""
    if row["status"] != STATUS_OK:
        return _error_card(row)
    h, w = int(row["height"]), int(row["width"])
    note = ""
    # 1. the source image (or a grey canvas)
    try:
        image = load_image(row["uri"], row["member"], storage, **(source or {}))
        if image.shape[:2] != (h, w):
            image = cv2.resize(image, (w, h))
    except Exception as e:  # the source may have moved since the run
        image = np.full((h, w, 3), 128, np.uint8)
        note = f"source image unavailable: {type(e).__name__}: {e}"
    views = [("image", image)]
    legend = []
    # 2. annotations: instance 1 is the highest-scoring; drawn lowest score first so the best is on top
    anns = sorted(row["annotations"] or [], key=lambda a: -(a["score"] if a.get("score") is not None else -np.inf))
    if anns:
        colours = [instance_colour(j) for j in range(len(anns))]
        masks = [rle_to_mask(a["segmentation"]).astype(bool) for a in anns]
        views.append((f"annotations ({len(anns)})", overlay_masks(image, masks[::-1], colours[::-1])))
        for j, (a, c) in enumerate(zip(anns[:MAX_LEGEND], colours), start=1):
            name = a.get("category") or cat_names.get(a.get("category_id"), a.get("category_id"))
            legend.append({"k": j, "colour": _rgb(c), "category": name,
                           "score": f"{a['score']:.2f}" if a.get("score") is not None else "—",
                           "labeler": a.get("labeler") or ""})
    # 3. tokens
    toks = row["subobjects"] or []
    if toks:
        label = rles_to_label_map([t["segmentation"] for t in toks], (h, w))
        views.append((f"tokens ({len(toks)})", overlay_tokens(image, label, seed=seed + k)))
    # 4. write the views and layer thumbnails
    parts = []
    for j, (title, img) in enumerate(views):
        name = f"sample_{k:03d}_{j}.png"
        st.write_bytes(st.join(out_dir, name), _png(_fit(img, MAX_SIDE)), storage)
        parts.append({"src": name, "title": title})
    layers = []
    for j, layer in enumerate(row.get("layers") or []):
        arr = _decode_layer(layer["png"]) if layer.get("png") else None
        if arr is None:
            continue
        name = f"sample_{k:03d}_layer_{j}.png"
        st.write_bytes(st.join(out_dir, name), _png(_fit(arr, THUMB_SIDE)), storage)
        caption = f"{layer.get('name')} ({layer.get('labeler')})" if layer.get("labeler") else layer.get("name")
        layers.append({"src": name, "label": caption})
    s = _scores(row)
    score_note = (f"lowest score {min(s):.2f}, mean {sum(s) / len(s):.2f}" if s else "no scored instances")
    return {"image_id": row["image_id"], "title": row.get("file_name") or row["uri"], "size": f"{w}×{h}",
            "score_note": score_note, "status": row["status"], "error": None, "note": note, "views": parts,
            "legend": legend, "legend_more": max(0, len(anns) - MAX_LEGEND), "layers": layers}


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("pseudolabel.jobs.outputs", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(TEMPLATE)


# ----------------------------------------------------------------------------- entry point

def report(output_uri: str, out_dir: str, storage: StorageSpec | None = None, sample: int = 24, seed: int = 0) -> str:
    """Write the QA report of a run.

    Args:
        output_uri: the run's output folder (local path, file:// or s3://).
        out_dir: folder for ``index.html``, its plots and PNGs (local path or s3://).
        storage: endpoint/credentials for s3:// (run, source images and out_dir).
        sample: how many images to show (seeded random sample of all rows, ``ok`` and error; shown
            worst first, see ``sort_key``).
        seed: sampling and token-colour seed.

    Returns:
        the URI of ``index.html``.
    """
    output_uri, out_dir = str(output_uri), str(out_dir)
    # 1. counts and summary
    cols = ["image_id", "uri", "member", "file_name", "width", "height", "status", "error"]
    rows = read_labels(output_uri, storage, columns=cols).to_pylist()
    summary = read_summary(output_uri, storage)
    n_ok = sum(r["status"] == STATUS_OK for r in rows)
    errors = [r for r in rows if r["status"] != STATUS_OK]
    cats = run_categories(output_uri, storage)
    cat_names = {c["id"]: c["name"] for c in cats}
    # 2. whole-run plots
    stats = run_stats(output_uri, storage)
    cat_rows = [{"id": c["id"], "name": c["name"], "labeler": c.get("labeler"),
                 "count": int(stats["counts"].get(c["id"], 0))} for c in cats]
    for cid in sorted(set(stats["counts"]) - set(cat_names), key=str):  # ids the run's category list misses
        cat_rows.append({"id": cid, "name": stats["names"].get(cid, str(cid)), "labeler": None,
                         "count": int(stats["counts"][cid])})
    for r in cat_rows:
        r["colour"] = _rgb(category_colour(r["id"] or 0))
    n_scored = sum(len(v) for v in stats["scores"].values())
    st.write_bytes(st.join(out_dir, SCORES_PNG), plot_scores(stats["scores"]), storage)
    st.write_bytes(st.join(out_dir, CATEGORIES_PNG), plot_categories(cat_rows), storage)
    plots = [{"src": SCORES_PNG, "alt": "histogram of instance scores",
              "caption": f"{n_scored} scored instances of {stats['annotations']} in {len(rows)} images"},
             {"src": CATEGORIES_PNG, "alt": "instances per category",
              "caption": f"{stats['annotations']} instances in {len(cat_rows)} categories"}]
    # 3. sample (all rows), read the full rows of the sample only, worst first
    ids = sorted(r["image_id"] for r in rows)
    chosen = sorted(random.Random(seed).sample(ids, min(sample, len(ids))))
    full = {}
    if chosen:
        t = read_labels(output_uri, storage, filter=pc.field("image_id").isin(chosen))
        full = {r["image_id"]: r for r in t.to_pylist()}
    ordered = sorted((full[i] for i in chosen if i in full), key=sort_key)
    source = run_source(output_uri, storage)  # the run's input format and image column
    cards = [_card(k, r, out_dir, storage, cat_names, seed, source) for k, r in enumerate(ordered)]
    n_sample_error = sum(c["error"] is not None for c in cards)
    # 4. the page
    facts = [("output", output_uri), ("run id", summary.get("run_id")), ("images", len(rows)),
             ("ok", n_ok), ("error", len(errors)), ("annotations", stats["annotations"]),
             ("seconds", _fmt(summary.get("seconds"))), ("images/s", _fmt(summary.get("images_per_s"))),
             ("labelers", ", ".join(str(x.get("name", x)) if isinstance(x, dict) else str(x)
                                    for x in summary.get("labelers") or []))]
    facts = [(k, "" if v is None else v) for k, v in facts]
    err_rows = [{"image_id": r["image_id"], "error": r["error"] or "",
                 "source": (r.get("file_name") or r["uri"]) + (f" :: {r['member']}" if r.get("member") else "")}
                for r in errors[:MAX_ERRORS_SHOWN]]
    page = _template().render(
        output_uri=output_uri, stamp=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), facts=facts,
        plots=plots, categories=cat_rows, errors=err_rows, n_errors=len(errors), cards=cards, n_images=len(rows),
        n_sample_ok=len(cards) - n_sample_error, n_sample_error=n_sample_error, seed=seed, order_note=ORDER_NOTE)
    index = st.join(out_dir, "index.html")
    st.write_bytes(index, page.encode("utf-8"), storage)
    return index
