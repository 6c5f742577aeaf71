"""The SparseK backward's span sort (csrc/selection/sort_key_spans.cu) on a GPU, against the
visit model's orders (bench/sparsek_bwd_visit_model.py: kd_order with pairs_by_end, and last
row descending), entry for entry, and its slice order (sort_key_spans.h: the slices by first
row tile, then last row tile descending, in kd order; the identity in last-row order); and
the row bands' lists (each band's pieces, kd-ordered by first and last row in the band) and
the dk/dv grid's CTA list over them. The gradients do not depend on the order
(test_backward_gpu.py covers them under both), so this is where a sort that loses the kd
order, or a slice whose first entry does not hold its latest last row, fails. Skipped
without a CUDA GPU visible to torch and the compiled kernels.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from blackwell_sparsek import _C  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import sparsek_bwd_visit_model as model  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _C.is_available()),
    reason=("needs a CUDA GPU visible to torch and the compiled kernels "
            f"(cuda={torch.cuda.is_available()}, library error: {_C.load_error()})"))

SLICE = 128  # the fused dk/dv kernel's slice (KeySpans::kKdLeaf)


def last_rows(u, tau, window, seqlen_k):
    """The last row that attends each key (tau_i < u, or the window band), -1 if none:
    written here from sort_key_spans.h's definition, not taken from the model."""
    rows = tau.size
    last = np.searchsorted(tau, u, side="left") - 1  # tau never decreases
    last[np.isneginf(u)] = -1
    if window > 0:
        band = np.arange(u.size) + window - 1 - (seqlen_k - rows)
        last = np.maximum(last, np.minimum(band, rows - 1))
    return last


def run_sort(u, tau, window, span, order, band_rows=0, tail_ctas=None):
    """The sort's results; with tail_ctas (row bands) also the visiting slices' counts and
    the CTA list (its length, then its entries), tail_ctas of it longest first."""
    ext = _C.extension()
    bh, seqlen_k = u.shape
    stride = ext.key_span_stride(tau.shape[1], seqlen_k)
    key_last_row = torch.empty((bh, seqlen_k), dtype=torch.int32, device="cuda")
    visiting = torch.full((bh,), -7, dtype=torch.int32, device="cuda")
    band_ctas = torch.full((1 + bh * stride // SLICE,), -7, dtype=torch.int32, device="cuda")
    slice_min_key = torch.full((bh, stride // SLICE), -7, dtype=torch.int32, device="cuda")
    with_list = tail_ctas is not None
    key_u = torch.from_numpy(u).cuda()
    tau_d = torch.from_numpy(tau).cuda()
    # Poisoned: every entry the sort owns must be written.
    sorted_u = torch.full((bh, stride), float("nan"), device="cuda")
    sorted_key = torch.full((bh, stride), -7, dtype=torch.int32, device="cuda")
    last_row = torch.full((bh, stride), -7, dtype=torch.int32, device="cuda")
    slice_order = torch.full((bh, stride // SLICE), -7, dtype=torch.int32, device="cuda")
    ext.sort_key_spans_pointers(
        key_u.data_ptr(), tau_d.data_ptr(), sorted_u.data_ptr(), sorted_key.data_ptr(),
        last_row.data_ptr(), slice_order.data_ptr(), bh, tau.shape[1], seqlen_k, window, span,
        order, torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream,
        band_rows, key_last_row.data_ptr(), visiting.data_ptr() if with_list else 0,
        band_ctas.data_ptr() if with_list else 0, tail_ctas if with_list else -1,
        slice_min_key.data_ptr())
    torch.cuda.synchronize()
    results = (sorted_u.cpu().numpy(), sorted_key.cpu().numpy(), last_row.cpu().numpy(),
               slice_order.cpu().numpy())
    if with_list:
        results += (visiting.cpu().numpy(), band_ctas.cpu().numpy())
    return results


def slice_tiles(keys, last, seqlen_k, seqlen_q, row_floor=None):
    """Each slice's (SLICE entries of the sorted keys and last rows) first and last 64-row
    tile, None for a slice that visits no row. row_floor: each slice's first row at least
    this (row bands: its band's first row)."""
    tiles = []
    for s in range(keys.size // SLICE):
        k = keys[s * SLICE:(s + 1) * SLICE]
        k = k[k >= 0]
        first_row = max(0, int(k.min()) - (seqlen_k - seqlen_q)) if k.size else None
        if first_row is not None and row_floor is not None:
            first_row = max(first_row, int(row_floor[s]))
        end = int(last[s * SLICE])
        tiles.append(None if first_row is None or end < first_row
                     else (first_row // 64, end // 64))
    return tiles


def expected_slice_order(keys, last, seqlen_k, seqlen_q, row_floor=None):
    """The slices by first 64-row tile, then last tile descending, then slice; slices that
    visit no row last."""
    first_tile, last_desc = [], []
    field_max = (1 << 20) - 1
    for t in slice_tiles(keys, last, seqlen_k, seqlen_q, row_floor):
        first_tile.append(field_max if t is None else t[0])
        last_desc.append(0 if t is None else field_max - 1 - t[1])
    slices = np.arange(len(first_tile))
    return np.lexsort((slices, np.array(last_desc), np.array(first_tile)))


# (S, T, window, span): whole spans; ragged last spans (the whole span's tree, cut at its
# keys: 808 keys, and 2904, past half the span); T < S; the window band; 8192-key spans with
# a ragged one.
CASES = [
    (8192, 8192, 0, 4096),
    (9000, 9000, 0, 4096),
    (7000, 7000, 0, 4096),
    (6144, 5000, 0, 2048),
    (8192, 8192, 512, 4096),
    (12288, 12288, 64, 8192),
    (3000, 3000, 0, 1024),
]


@pytest.mark.parametrize("order", ["kd", "last-row"])
@pytest.mark.parametrize("seqlen_k,seqlen_q,window,span", CASES)
def test_span_sort_matches_the_model(seqlen_k, seqlen_q, window, span, order):
    rng = np.random.default_rng(seqlen_k + seqlen_q + window + span)
    bh = 2
    u = rng.standard_normal((bh, seqlen_k)).astype(np.float32)
    u[rng.random((bh, seqlen_k)) < 0.1] = -np.inf  # scores never selected
    # Thresholds rising through the scores' range: keys end at rows all over [-1, T).
    tau = np.sort(rng.uniform(-2.5, 3.0, (bh, seqlen_q)).astype(np.float32), axis=1)
    got_u, got_key, got_last, got_order = run_sort(u, tau, window, span, order)
    used = -(-seqlen_k // span) * span  # the entries the sort writes in a row
    for b in range(bh):
        last = last_rows(u[b], tau[b], window, seqlen_k)
        for begin in range(0, seqlen_k, span):
            n = min(span, seqlen_k - begin)
            pos = np.arange(n)
            end = last[begin:begin + n]
            if order == "kd":
                expected = model.kd_order(pos, end, SLICE, pairs_by_end=True, span=span)
            else:
                expected = np.lexsort((pos, -end))
            where = f"batch head {b}, span at {begin}"
            np.testing.assert_array_equal(got_key[b, begin:begin + n], begin + expected,
                                          err_msg=where)
            np.testing.assert_array_equal(got_last[b, begin:begin + n], end[expected],
                                          err_msg=where)
            np.testing.assert_array_equal(got_u[b, begin:begin + n], u[b, begin + expected],
                                          err_msg=where)
            # Padding past S: no key, no row, never selected.
            pad = slice(begin + n, begin + span)
            assert (got_key[b, pad] == -1).all() and (got_last[b, pad] == -1).all(), where
            assert np.isneginf(got_u[b, pad]).all(), where
            if order == "kd":
                # The dk/dv kernel bounds a slice's rows by its first entry's last row.
                for s in range(begin, begin + n, SLICE):
                    slice_last = got_last[b, s:min(s + SLICE, begin + n)]
                    assert slice_last[0] == slice_last.max(), where
        slices = used // SLICE
        if order == "kd":
            want = expected_slice_order(got_key[b, :used], got_last[b, :used], seqlen_k,
                                        seqlen_q)
        else:
            want = np.arange(slices)
        np.testing.assert_array_equal(got_order[b, :slices], want,
                                      err_msg=f"batch head {b}: slice order")


BAND_SPAN = 4096  # KeyBands::kSpan


# (S, T, window, band rows): several bands with keys carried through them; a band list past
# one kd span; T < S; a ragged last band; the window band only (W > 0, few selected keys);
# band lists of a whole kd span and a ragged second one (1300-2600 pieces, and 66: a span
# of one slice).
BAND_CASES = [
    (6000, 6000, 0, 1024),
    (9000, 9000, 64, 2048),
    (7000, 5000, 32, 1024),
    (5000, 5000, 256, 1024),
    (20000, 20000, 128, 2048),
    (12000, 12000, 0, 4096),
]


@pytest.mark.parametrize("seqlen_k,seqlen_q,window,band_rows", BAND_CASES)
def test_band_sort_matches_the_model(seqlen_k, seqlen_q, window, band_rows):
    """Row bands (sort_key_spans.h, KeyOrder::kBands): each band's list holds exactly the keys
    a row of the band attends, each last row clipped to the band, in kd order of (first row
    in the band, last row) span by span (KeyBands::kSpan entries of the list), then padding;
    the slices by first row tile, no slice starting before its band; the visiting slices'
    count; and the dk/dv grid's CTA list (BandCtas) with its tail longest first."""
    ext = _C.extension()
    rng = np.random.default_rng(seqlen_k + seqlen_q + window + band_rows)
    bh = 2
    u = rng.standard_normal((bh, seqlen_k)).astype(np.float32)
    u[rng.random((bh, seqlen_k)) < 0.1] = -np.inf
    tau = np.sort(rng.uniform(-2.5, 3.0, (bh, seqlen_q)).astype(np.float32), axis=1)
    tail = 5 + band_rows // 1024  # fewer than the visiting slices: the list's tail sorts
    got_u, got_key, got_last, got_order, got_visiting, got_list = run_sort(
        u, tau, window, BAND_SPAN, "bands", band_rows, tail_ctas=tail)
    capacities = ext.key_band_layout(seqlen_q, seqlen_k, band_rows)
    offset = seqlen_k - seqlen_q
    positions = np.arange(seqlen_k)
    first_rows = np.maximum(0, positions - offset)
    slice_rows = []  # each head's visiting slices' row tiles, in the slice order
    for b in range(bh):
        last = last_rows(u[b], tau[b], window, seqlen_k)
        begin = 0
        row_floor = []
        for band, capacity in enumerate(capacities):
            row0 = band * band_rows
            row_end = min(seqlen_q, row0 + band_rows) - 1
            reach = min(seqlen_k, row_end + offset + 1)
            keep = ((positions < reach) & (last >= row0) & (last >= first_rows))
            keys = positions[keep]
            ends = np.minimum(last[keep], row_end)
            starts = np.maximum(first_rows[keep], row0)
            assert keys.size <= capacity
            where = f"batch head {b}, band {band}"
            for s0 in range(0, keys.size, BAND_SPAN):
                n = min(BAND_SPAN, keys.size - s0)
                order = model.kd_order(starts[s0:s0 + n], ends[s0:s0 + n], SLICE,
                                       pairs_by_end=True, span=BAND_SPAN)
                at = slice(begin + s0, begin + s0 + n)
                np.testing.assert_array_equal(got_key[b, at], keys[s0 + order], err_msg=where)
                np.testing.assert_array_equal(got_last[b, at], ends[s0 + order],
                                              err_msg=where)
                np.testing.assert_array_equal(got_u[b, at], u[b, keys[s0 + order]],
                                              err_msg=where)
                for s in range(0, n, SLICE):  # a slice's first entry: its latest last row
                    part = got_last[b, at][s:s + SLICE]
                    assert part[0] == part.max(), where
            pad = slice(begin + keys.size, begin + capacity)
            assert (got_key[b, pad] == -1).all() and (got_last[b, pad] == -1).all(), where
            assert np.isneginf(got_u[b, pad]).all(), where
            row_floor += [row0] * (capacity // SLICE)
            begin += capacity
        want = expected_slice_order(got_key[b, :begin], got_last[b, :begin], seqlen_k,
                                    seqlen_q, row_floor=np.array(row_floor))
        np.testing.assert_array_equal(got_order[b, :begin // SLICE], want,
                                      err_msg=f"batch head {b}: slice order")
        tiles = slice_tiles(got_key[b, :begin], got_last[b, :begin], seqlen_k, seqlen_q,
                            row_floor=np.array(row_floor))
        visits = [tiles[slice] is not None for slice in want]
        count = sum(visits)
        assert all(visits[:count]) and not any(visits[count:]), f"batch head {b}"
        assert got_visiting[b] == count, f"batch head {b}: visiting slices"
        slice_rows.append([tiles[slice][1] - tiles[slice][0] + 1 for slice in want[:count]])
    # The CTA list: every head's visiting ranks head by head, the last `tail` of them by row
    # tiles descending (ties in list order).
    slices_stride = got_order.shape[1]
    entries = [b * slices_stride + r for b in range(bh) for r in range(len(slice_rows[b]))]
    rows = [n for b in range(bh) for n in slice_rows[b]]
    cut = max(0, len(entries) - tail)
    last = sorted(range(cut, len(entries)), key=lambda i: (-rows[i], i))
    want_list = entries[:cut] + [entries[i] for i in last]
    assert got_list[0] == len(want_list), "the CTA list's length"
    np.testing.assert_array_equal(got_list[1:1 + len(want_list)], want_list,
                                  err_msg="the CTA list")
    assert len(set(rows[cut:])) > 1, "the case sorts nothing in the list's tail"
