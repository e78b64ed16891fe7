"""Boundary map -> tokens post-processing (shared by directsam and the classical baseline), and the
vectorised label-map RLE encoder."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pseudolabel.models.tokens import boundary_to_tokens, token_areas
from pseudolabel.schemas.coco import label_map_to_rles, mask_to_rle, rle_to_mask


def cell_boundary_map(h: int, w: int, n_cells: int, seed: int = 0) -> np.ndarray:
    """(h, w) float32 in [0, 1]: blurred edges of a random Voronoi partition plus faint noise."""
    rng = np.random.default_rng(seed)
    pts = rng.random((n_cells, 2)) * [h, w]
    yy, xx = np.mgrid[:h, :w]
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    cells = d.argmin(-1)
    edge = np.zeros((h, w), np.float32)
    edge[:, 1:] += cells[:, 1:] != cells[:, :-1]
    edge[1:, :] += cells[1:, :] != cells[:-1, :]
    edge = ndimage.gaussian_filter(np.minimum(edge, 1), 1.0)
    edge = edge / edge.max() + rng.random((h, w)).astype(np.float32) * 0.05
    return np.clip(edge, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def prob():
    return cell_boundary_map(72, 96, 25)


def test_partition_covers_every_pixel_exactly_once(prob):
    tokens = boundary_to_tokens(prob, 0.2, "partition")
    lm = tokens.label_map
    assert lm.shape == prob.shape and lm.dtype == np.int32
    assert (lm > 0).all()
    k = int(lm.max())
    assert k >= 10
    assert set(np.unique(lm)) == set(range(1, k + 1))
    rles, _ = label_map_to_rles(lm)
    cover = sum(rle_to_mask(r).astype(np.int32) for r in rles)
    assert (cover == 1).all()
    assert tokens.boundary_score.shape == (k,) and tokens.boundary_score.dtype == np.float32


def test_simple_leaves_boundary_unassigned_and_tokens_are_8_connected(prob):
    thr = 0.2
    lm = boundary_to_tokens(prob, thr, "simple").label_map
    assert (lm[prob >= thr] == 0).all()
    assert (lm[prob < thr] > 0).all()  # nothing dropped without max_tokens/min_area
    eight = np.ones((3, 3), bool)
    for k in range(1, int(lm.max()) + 1):
        _, n = ndimage.label(lm == k, structure=eight)
        assert n == 1
    # tokens are maximal: as many tokens as 8-connected components of the assigned pixels
    _, n_components = ndimage.label(lm > 0, structure=eight)
    assert n_components == lm.max()


def test_connectivity_differs_between_modes():
    # two interior pixels touching only diagonally, everything else boundary
    prob = np.ones((4, 4), np.float32)
    prob[1, 1] = prob[2, 2] = 0.0
    simple = boundary_to_tokens(prob, 0.5, "simple").label_map
    assert simple.max() == 1 and simple[1, 1] == simple[2, 2] == 1
    part = boundary_to_tokens(prob, 0.5, "partition").label_map
    assert part.max() == 2 and part[1, 1] != part[2, 2] and (part > 0).all()


@pytest.mark.parametrize("mode", ["simple", "partition"])
def test_area_ordering(prob, mode):
    lm = boundary_to_tokens(prob, 0.2, mode).label_map
    areas = token_areas(lm)
    assert len(areas) > 5 and (areas > 0).all()
    assert (np.diff(areas) <= 0).all()


@pytest.mark.parametrize("mode", ["simple", "partition"])
def test_max_tokens_keeps_the_largest(prob, mode):
    full = boundary_to_tokens(prob, 0.2, mode).label_map
    cut = boundary_to_tokens(prob, 0.2, mode, max_tokens=5)
    lm = cut.label_map
    assert lm.max() == 5 and len(cut.boundary_score) == 5
    if mode == "partition":
        assert (lm > 0).all()  # dropped tokens are merged into kept neighbours
        assert token_areas(lm).sum() == lm.size
    else:
        # the five largest simple tokens are kept unchanged
        for k in range(1, 6):
            assert np.array_equal(lm == k, full == k)
        assert (lm[full > 5] == 0).all()
    assert (np.diff(token_areas(lm)) <= 0).all()


@pytest.mark.parametrize("mode", ["simple", "partition"])
def test_min_area_drops_small_tokens(mode):
    prob = np.zeros((20, 20), np.float32)
    prob[:, 10] = 1.0          # wall: left 200 px / right 180 px
    prob[5, 11:] = 1.0         # a horizontal wall on the right: 5x9 = 45 px above, 14x9 = 126 below
    prob[0:3, 0:3] = 1.0
    prob[1, 1] = 0.0           # an isolated 1-px interior
    base = boundary_to_tokens(prob, 0.5, mode)
    assert base.label_map.max() == 4
    cut = boundary_to_tokens(prob, 0.5, mode, min_area=10)
    assert cut.label_map.max() == 3
    if mode == "simple":
        assert cut.label_map[1, 1] == 0
    else:
        assert (cut.label_map > 0).all()


def test_boundary_score_hand_computed_simple():
    prob = np.array([[0.0, 0.0, 0.9, 0.1],
                     [0.0, 0.0, 0.3, 0.1],
                     [0.0, 0.0, 0.6, 0.1],
                     [0.5, 0.5, 0.5, 0.1]], np.float32)
    tokens = boundary_to_tokens(prob, 0.3, "simple")
    lm = tokens.label_map
    # token 1: the 2x3 block (6 px); token 2: the right column (4 px); 0.3 is not < 0.3
    assert np.array_equal(lm, [[1, 1, 0, 2], [1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 2]])
    # edge pairs of token 1: right (.9, .3, .6), down (.5, .5); token 2: left (.9, .3, .6, .5)
    np.testing.assert_allclose(tokens.boundary_score, [(0.9 + 0.3 + 0.6 + 0.5 + 0.5) / 5,
                                                       (0.9 + 0.3 + 0.6 + 0.5) / 4], rtol=1e-6)


def test_boundary_score_hand_computed_partition():
    prob = np.array([[0.0, 0.1, 0.9, 0.4, 0.0],
                     [0.0, 0.1, 0.9, 0.4, 0.0]], np.float32)
    tokens = boundary_to_tokens(prob, 0.5, "partition")
    lm = tokens.label_map
    assert (lm > 0).all() and lm.max() == 2
    assert lm[0, 2] == lm[1, 2]
    # whichever side takes the wall, every edge pair crosses the 0.9 column
    np.testing.assert_allclose(tokens.boundary_score, [0.9, 0.9], rtol=1e-6)
    # a single token covering the image has no edge
    one = boundary_to_tokens(np.zeros((3, 4), np.float32), 0.5, "partition")
    assert (one.label_map == 1).all() and one.boundary_score.tolist() == [0.0]


@pytest.mark.parametrize("mode", ["simple", "partition"])
def test_threshold_on_two_region_map(mode):
    prob = np.full((6, 9), 0.05, np.float32)
    prob[:, 4] = 0.5                      # a weak wall between two flat regions
    prob[:, 6:] = 0.2                     # the right region is a bit noisier
    two = boundary_to_tokens(prob, 0.3, mode).label_map
    assert two.max() == 2
    assert len(np.unique(two[:, :4])) == 1 and len(np.unique(two[:, 5:])) == 1
    assert two[0, 0] != two[0, 8]
    if mode == "simple":
        assert (two[:, 4] == 0).all()
    else:
        assert (two > 0).all()
    # above the wall's strength: one region
    one = boundary_to_tokens(prob, 0.6, mode).label_map
    assert one.max() == 1 and (one == 1).all()
    # below the right region's level: only the left region survives as interior
    low = boundary_to_tokens(prob, 0.1, mode).label_map
    assert low.max() == 2
    if mode == "simple":
        assert (low[:, 5] > 0).all() and (low[:, 6:] == 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError):
        boundary_to_tokens(np.zeros((2, 2, 3)), 0.5)
    with pytest.raises(ValueError):
        boundary_to_tokens(np.zeros((4, 4)), 0.5, mode="nope")
    with pytest.raises(ValueError):
        boundary_to_tokens(np.zeros((4, 4)), 0.5, max_tokens=0)


@pytest.mark.parametrize("mode", ["simple", "partition"])
def test_label_map_rles_match_one_mask_at_a_time(prob, mode):
    lm = boundary_to_tokens(prob[:, :77], 0.2, mode).label_map
    rles, labels = label_map_to_rles(lm)
    assert list(labels) == list(range(1, int(lm.max()) + 1))
    for k, rle in zip(labels, rles):
        assert rle == mask_to_rle(lm == k)
    # a chosen subset in a chosen order, including an absent label
    pick = np.array([3, 1, 9999])
    rles, labels = label_map_to_rles(lm.astype(np.int64), pick)
    assert list(labels) == [3, 1, 9999]
    assert [rle_to_mask(r).sum() for r in rles] == [(lm == 3).sum(), (lm == 1).sum(), 0]
    assert rles[0] == mask_to_rle(lm == 3)
    rles, labels = label_map_to_rles(np.zeros((4, 5), np.int32))
    assert rles == [] and len(labels) == 0


def test_label_map_regions_areas_and_boxes_equal_pycocotools():
    """Areas and boxes from the runs equal pycocotools' ``area``/``toBbox`` of the same RLEs: regions
    within one column, regions whose runs continue into the next column (full-height boxes there),
    labels absent from the map (zeros), requested in any order."""
    from pseudolabel.schemas.coco import label_map_regions, rle_area, rle_bbox_xywh

    rng = np.random.default_rng(3)
    maps = [rng.integers(0, 6, (37, 23)), (rng.random((50, 40)) > 0.5).astype(np.int32),
            np.arange(20).reshape(4, 5), np.zeros((5, 5), np.int32), rng.integers(0, 300, (64, 80))]
    lm = np.zeros((30, 20), np.int32)
    lm[25:, 3] = 1  # bottom of column 3 ...
    lm[:4, 4] = 1   # ... continuing at the top of column 4: one run across columns
    lm[10:12, 7:9] = 2
    maps.append(lm)
    for lm in maps:
        for labels in (None, np.array([2, 7, 1, 999]), np.array([3])):
            rles, areas, boxes, got = label_map_regions(lm, labels)
            assert areas.dtype == np.float64 and boxes.dtype == np.float32
            np.testing.assert_array_equal(areas, rle_area(rles))
            np.testing.assert_array_equal(boxes, rle_bbox_xywh(rles))
            assert [r["counts"] for r in rles] == [r["counts"] for r in label_map_to_rles(lm, labels)[0]]
    _, areas, boxes, _ = label_map_regions(maps[-1], np.array([1, 2]))
    assert areas.tolist() == [9, 4] and boxes.tolist() == [[3, 0, 2, 30], [7, 10, 2, 2]]
