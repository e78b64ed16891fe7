"""Visual QA report of a finished run: one offline HTML page plus PNG overlays next to it.

``report(output_uri, out_dir)`` writes ``out_dir/index.html`` (no external assets: inline CSS, images
referenced by relative file name) with

1. the run summary: images / ok / error counts, seconds, images/s, run id, labelers, categories;
2. the error rows with their messages;
3. a grid of sampled ``ok`` images (seeded), each with: the image; its annotations overlaid
   (colour per category, semi-transparent fill, outline) with category/score captions; its subobject
   tokens as a random-colour label map with white boundaries; its layers as thumbnails.

Source images are read back from each row's ``uri``/``member`` (plain file, tar member, Parquet row);
when the source can no longer be read the overlays are drawn on a grey canvas and the card says so.
"""
from __future__ import annotations

import colorsys
import html
import random
from datetime import datetime, timezone

import cv2
import numpy as np
import pyarrow.compute as pc

from pseudolabel import storage as st
from pseudolabel.jobs.labels_io import categories as run_categories
from pseudolabel.jobs.labels_io import load_image, read_labels, read_summary, rles_to_label_map
from pseudolabel.jobs.metrics import label_boundaries
from pseudolabel.schemas.coco import rle_to_mask
from pseudolabel.schemas.spec import StorageSpec
from pseudolabel.schemas.tables import STATUS_OK

MAX_SIDE = 384  # longest side of the images shown in the grid
THUMB_SIDE = 128  # longest side of layer thumbnails
MAX_ERRORS_SHOWN = 500

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f0f0f0}
.grid{display:flex;flex-wrap:wrap;gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;max-width:820px}
.card img{image-rendering:auto;border:1px solid #eee;margin:2px}
.views{display:flex;flex-wrap:wrap;gap:4px;align-items:flex-start}
.cap{font-size:12px;color:#444;margin:4px 0}.sw{display:inline-block;width:10px;height:10px;margin-right:3px;
border:1px solid #888}.warn{color:#a40}.layers figure{display:inline-block;margin:2px;font-size:11px}
.mono{font-family:ui-monospace,monospace;font-size:12px}
"""


# ----------------------------------------------------------------------------- drawing (pure)

def category_colour(category_id: int) -> tuple[int, int, int]:
    """A stable, saturated RGB colour for a category id (golden-angle hues)."""
    h = (int(category_id) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
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
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[..., ::-1]
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[..., [2, 1, 0, 3]]
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _decode_layer(data: bytes) -> np.ndarray | None:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        return None
    if arr.dtype != np.uint8:
        arr = (arr / max(1, arr.max()) * 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[..., ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., [2, 1, 0, 3]]
    return arr


# ----------------------------------------------------------------------------- page pieces

def _esc(v) -> str:
    return html.escape("" if v is None else str(v))


def _kv_table(items: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items) + "</table>"


def _fmt(v, digits: int = 2):
    return f"{v:.{digits}f}" if isinstance(v, float) else v


def _card(k: int, row: dict, out_dir: str, storage, cat_names: dict, seed: int) -> str:
    """Write one sample's PNGs and return its HTML card."""
    h, w = int(row["height"]), int(row["width"])
    note = ""
    # 1. the source image (or a grey canvas)
    try:
        image = load_image(row["uri"], row["member"], storage)
        if image.shape[:2] != (h, w):
            image = cv2.resize(image, (w, h))
    except Exception as e:  # the source may have moved since the run
        image = np.full((h, w, 3), 128, np.uint8)
        note = f"<div class='cap warn'>source image unavailable: {_esc(type(e).__name__)}: {_esc(e)}</div>"
    views = [("image", image)]
    captions = []
    # 2. annotations, lowest score first so the best is on top
    anns = sorted(row["annotations"] or [], key=lambda a: a.get("score") or 0.0)
    if anns:
        masks = [rle_to_mask(a["segmentation"]).astype(bool) for a in anns]
        colours = [category_colour(a.get("category_id") or 0) for a in anns]
        views.append((f"annotations ({len(anns)})", overlay_masks(image, masks, colours)))
        for a, c in sorted(zip(anns, colours), key=lambda t: -(t[0].get("score") or 0.0)):
            name = a.get("category") or cat_names.get(a.get("category_id"), a.get("category_id"))
            score = a.get("score")
            captions.append(f"<span class='sw' style='background:rgb{c}'></span>{_esc(name)}"
                            + (f" {score:.2f}" if score is not None else "")
                            + (f" <span class='mono'>[{_esc(a.get('labeler'))}]</span>" if a.get("labeler") else ""))
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
        parts.append(f"<figure style='margin:0'><img src='{name}' alt='{_esc(title)}' title='{_esc(title)}'>"
                     f"<figcaption class='cap'>{_esc(title)}</figcaption></figure>")
    layers = []
    for j, layer in enumerate(row.get("layers") or []):
        arr = _decode_layer(layer["png"]) if layer.get("png") else None
        if arr is None:
            continue
        name = f"sample_{k:03d}_layer_{j}.png"
        st.write_bytes(st.join(out_dir, name), _png(_fit(arr, THUMB_SIDE)), storage)
        label = f"{layer.get('name')} ({layer.get('labeler')})" if layer.get("labeler") else layer.get("name")
        layers.append(f"<figure><img src='{name}' alt='{_esc(label)}'><figcaption>{_esc(label)}</figcaption></figure>")
    title = _esc(row.get("file_name") or row["uri"])
    return (f"<div class='card'><div class='cap'><b>{title}</b> <span class='mono'>{_esc(row['image_id'])}</span>"
            f" {w}×{h}</div>{note}<div class='views'>{''.join(parts)}</div>"
            + (f"<div class='cap'>{' &nbsp; '.join(captions)}</div>" if captions else "")
            + (f"<div class='layers'>{''.join(layers)}</div>" if layers else "") + "</div>")


# ----------------------------------------------------------------------------- entry point

def report(output_uri: str, out_dir: str, storage: StorageSpec | None = None, sample: int = 24, seed: int = 0) -> str:
    """Write the QA report of a run.

    Args:
        output_uri: the run's output folder (local path, file:// or s3://).
        out_dir: folder for ``index.html`` and its PNGs (local path or s3://).
        storage: endpoint/credentials for s3:// (run, source images and out_dir).
        sample: how many ``ok`` images to show (seeded random sample).
        seed: sampling and token-colour seed.

    Returns:
        the URI of ``index.html``.
    """
    output_uri, out_dir = str(output_uri), str(out_dir)
    # 1. counts and summary
    cols = ["image_id", "uri", "member", "file_name", "width", "height", "status", "error"]
    table = read_labels(output_uri, storage, columns=cols)
    rows = table.to_pylist()
    summary = read_summary(output_uri, storage)
    ok_ids = sorted(r["image_id"] for r in rows if r["status"] == STATUS_OK)
    errors = [r for r in rows if r["status"] != STATUS_OK]
    cats = run_categories(output_uri, storage)
    cat_names = {c["id"]: c["name"] for c in cats}
    # 2. sample and read the full rows of the sample only
    chosen = sorted(random.Random(seed).sample(ok_ids, min(sample, len(ok_ids))))
    full = {}
    if chosen:
        t = read_labels(output_uri, storage, filter=pc.field("image_id").isin(chosen))
        full = {r["image_id"]: r for r in t.to_pylist()}
    cards = [_card(k, full[i], out_dir, storage, cat_names, seed) for k, i in enumerate(chosen) if i in full]
    # 3. the page
    n_ann = pc.sum(pc.list_value_length(read_labels(output_uri, storage, columns=["annotations"])
                                        .column("annotations"))).as_py() if rows else 0
    facts = [("output", output_uri), ("run id", summary.get("run_id")), ("images", len(rows)),
             ("ok", len(ok_ids)), ("error", len(errors)), ("annotations", n_ann or 0),
             ("seconds", _fmt(summary.get("seconds"))), ("images/s", _fmt(summary.get("images_per_s"))),
             ("labelers", ", ".join(str(x.get("name", x)) if isinstance(x, dict) else str(x)
                                    for x in summary.get("labelers") or []))]
    cat_rows = "".join(f"<tr><td>{c['id']}</td><td><span class='sw' style='background:rgb{category_colour(c['id'])}'>"
                       f"</span>{_esc(c['name'])}</td><td>{_esc(c.get('labeler'))}</td></tr>" for c in cats)
    err_rows = "".join(f"<tr><td class='mono'>{_esc(r['image_id'])}</td><td>{_esc(r.get('file_name') or r['uri'])}"
                       f"{(' :: ' + _esc(r['member'])) if r.get('member') else ''}</td><td>{_esc(r['error'])}</td></tr>"
                       for r in errors[:MAX_ERRORS_SHOWN])
    more = f"<p>… and {len(errors) - MAX_ERRORS_SHOWN} more</p>" if len(errors) > MAX_ERRORS_SHOWN else ""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pseudolabel report: {_esc(output_uri)}</title>
<style>{_CSS}</style></head><body>
<h1>pseudolabel run report</h1>
<p class="cap">generated {stamp}</p>
<h2>Summary</h2>{_kv_table(facts)}
<h2>Categories ({len(cats)})</h2>
<table><tr><th>id</th><th>name</th><th>labeler</th></tr>{cat_rows}</table>
<h2>Errors ({len(errors)})</h2>
{"<table><tr><th>image_id</th><th>source</th><th>message</th></tr>" + err_rows + "</table>" + more if errors else "<p>none</p>"}
<h2>Sample ({len(cards)} of {len(ok_ids)} ok images, seed {seed})</h2>
<div class="grid">{''.join(cards)}</div>
</body></html>
"""
    index = st.join(out_dir, "index.html")
    st.write_bytes(index, page.encode("utf-8"), storage)
    return index
