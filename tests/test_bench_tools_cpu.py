"""The benchmark directory's analysis tools that run without a GPU, on made-up inputs."""
from __future__ import annotations

import io
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import ncu_source_summary  # noqa: E402
import sass_waits  # noqa: E402

HEADER = ['"Address"', '"Source"', '"Warp Stall Sampling (All Samples)"',
          '"Warp Stall Sampling (Not-issued Samples)"', '"Instructions Executed"',
          '"stall_wait"', '"stall_long_sb"', '"stall_wait (Not Issued)"']
ROWS = [  # source, samples, executed, wait, long_sb
    ("IMAD R1, R2, R3, RZ", 10, 100, 10, 0),
    ("HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ", 30, 100, 0, 30),
    ("FADD R5, R6, R7", 20, 200, 5, 15),
    ("EXIT", 40, 100, 40, 0),
]


def _page(tmp_path):
    lines = ['"Kernel Name","void k()"', ",".join(HEADER)]
    for i, (src, samples, executed, wait, long_sb) in enumerate(ROWS):
        cells = [f"0x{16 * i:x}", f"      {src}", samples, samples, executed, wait, long_sb, 0]
        lines.append(",".join(f'"{c}"' for c in cells))
    path = tmp_path / "page.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_source_page_is_read(tmp_path):
    instrs, reasons = ncu_source_summary.read_source_page(_page(tmp_path))
    assert reasons == ["wait", "long_sb"]
    assert [i["source"] for i in instrs] == [r[0] for r in ROWS]
    assert [i["samples"] for i in instrs] == [10, 30, 20, 40]
    assert instrs[2]["stalls"] == {"wait": 5, "long_sb": 15}


def test_regions_sum_samples_and_stalls(tmp_path):
    instrs, _ = ncu_source_summary.read_source_page(_page(tmp_path))
    out = io.StringIO()
    ncu_source_summary.regions(instrs, [(0, 2), (2, 4)], out)
    first, second = out.getvalue().splitlines()
    assert first.startswith("[0, 2)  40.0% of samples, 200 instructions executed; long_sb 75.0%")
    assert second.startswith("[2, 4)  60.0% of samples, 300 instructions executed; wait 75.0%")


def test_landmarks_accumulate_between_printed_lines(tmp_path):
    instrs, _ = ncu_source_summary.read_source_page(_page(tmp_path))
    out = io.StringIO()
    ncu_source_summary.landmarks(instrs, min_share=0.5, out=out)
    lines = out.getvalue().splitlines()
    # The wgmma and the exit are landmarks; the IMAD's samples go with the wgmma's line, the
    # FADD's with the exit's.
    assert [line.split()[0] for line in lines] == ["1", "3"]
    assert "40.00%" in lines[0] and "60.00%" in lines[1]


def test_cluster_tile_reads():
    import numpy as np
    import pytest
    import sparsek_bwd_visit_model

    # CTA tiles (64 rows): [0, 1], [0], [2], none.
    row_lo = np.array([0, 0, 128, 64])
    num_rows = np.array([128, 64, 64, 0])
    reads = sparsek_bwd_visit_model.cluster_tile_reads
    assert reads(row_lo, num_rows, 1, 64) == (4, 4)
    assert reads(row_lo, num_rows, 2, 64) == (4, 3)
    assert reads(row_lo, num_rows, 4, 64) == (4, 3)
    # A CTA that starts inside a tile reads the whole tile (steps start at multiples of 64):
    # rows 70-129 are tiles 1 and 2, rows 0-127 tiles 0 and 1.
    assert reads(np.array([70, 0]), np.array([60, 128]), 2, 64) == (4, 3)
    with pytest.raises(ValueError, match="multiple of the cluster size"):
        reads(row_lo, num_rows, 3, 64)


def test_kd_order():
    """kd_order: the tree's split sizes and coordinates, the leaves' order, and fewer visited
    pairs than the last-row order on the benchmark's scores."""
    import numpy as np
    import sparsek_bwd_visit_model as m

    # Four keys, slices of 1: starts spread over 3, ends over 30: the root splits by end,
    # ascending (keys 3, 1 | 2, 0), and each half by end again (extents 2 against 5 and 2
    # against 10).
    start = np.array([0, 1, 2, 3])
    end = np.array([30, 5, 20, 0])
    assert m.kd_order(start, end, 1).tolist() == [3, 1, 2, 0]
    # Seven keys in slices of 2: ceil(7 / 2) = 4 slices split 2 + 2 (4 keys | 3), by start
    # (extents 6 and 6: a tie takes the start), then 1 + 1 each; a leaf is sorted by end
    # descending, then start.
    start = np.arange(7)
    end = np.array([6, 6, 3, 3, 9, 9, 9])
    order = m.kd_order(start, end, 2)
    assert sorted(order.tolist()) == list(range(7))
    assert order.tolist() == [0, 1, 2, 3, 4, 5, 6]
    rng = np.random.default_rng(0)
    start = np.arange(1000)
    end = start + rng.integers(0, 5000, 1000)
    order = m.kd_order(start, end, 128)
    assert sorted(order.tolist()) == list(range(1000))
    for leaf in np.split(order, range(128, 1000, 128)):
        assert (np.diff(end[leaf]) <= 0).all()  # the first entry holds the latest end
    u, tau, attended = m.model_scores(8192, 1.0, 256, 64, 0)
    kd, *_ = m.visited_pairs(u, tau, 4096, 64, 128, 64, order="kd")
    by_last, *_ = m.visited_pairs(u, tau, 1024, 64, 128, 64, order="last-row")
    assert attended <= kd < by_last


def test_kd_order_pairs_by_end():
    """kd_order's pairs_by_end: a node of two slices splits by last row even where the
    positions spread more, so that both slices start on the same rows."""
    import numpy as np
    import sparsek_bwd_visit_model as m

    # Four keys, slices of 1 (a node of 2 entries is a pair): positions spread over 30, ends
    # over 3. By extents the pairs split by position; with pairs_by_end by end, ascending.
    start = np.array([0, 10, 20, 30])
    end = np.array([3, 1, 2, 0])
    assert m.kd_order(start, end, 2).tolist() == [0, 1, 2, 3]
    assert m.kd_order(start, end, 1).tolist() == [0, 1, 2, 3]
    assert m.kd_order(start, end, 1, pairs_by_end=True).tolist() == [1, 0, 3, 2]


def test_kd_order_aligned_tree():
    """kd_order's tree is a whole span's, cut at the entries: a node is an aligned run of
    span >> depth places and splits into its halves, so five entries in a span of eight
    split 4 | 1 (halves of whole slices would split 2 | 3); a node whose entries fit its
    first half splits into that half alone; span must be block_n times a power of two."""
    import numpy as np
    import pytest
    import sparsek_bwd_visit_model as m

    # Slices of 1. Starts spread over 4, ends over 10: the root (8 places) splits by end,
    # ascending: keys 1, 3, 2, 4 | 0. Then {1, 3, 2, 4} by end again (starts 3, ends 7):
    # 1, 3 | 2, 4; {1, 3} by start (2 against 1), {2, 4} by start on the tie (2 and 2).
    start = np.arange(5)
    end = np.array([10, 0, 5, 1, 7])
    assert m.kd_order(start, end, 1).tolist() == [1, 3, 2, 4, 0]
    assert m.kd_order(start, end, 1, span=8).tolist() == [1, 3, 2, 4, 0]
    # In a span of 16 the root's entries fit its first half: the same tree one level down.
    assert m.kd_order(start, end, 1, span=16).tolist() == [1, 3, 2, 4, 0]
    for bad in (4, 6, 12):
        with pytest.raises(ValueError, match="span must be"):
            m.kd_order(start, end, 1, span=bad)
    # Slices of 2 in a span of 8 (4 slices): 5 entries split 4 | 1, then 2 | 2; leaves by end
    # descending.
    assert m.kd_order(start, end, 2, span=8).tolist() == [3, 1, 4, 2, 0]


def test_l2_model():
    """sparsek_bwd_l2_model: slice orders, and the simulation's steps, misses and makespan on
    hand-checked grids."""
    import numpy as np
    import sparsek_bwd_l2_model as l2

    first = np.array([3, 0, 0, 2])
    last = np.array([4, 5, 1, -1])
    assert l2.slice_order(first, last, "spans").tolist() == [0, 1, 2, 3]
    # By first tile, then last tile descending: slices 1 (0..5), 2 (0..1), 3 (2, no rows), 0.
    assert l2.slice_order(first, last, "start").tolist() == [1, 2, 3, 0]
    # Two SMs, clusters of 1, one query head: both slices read tiles 0 and 1 at the same
    # steps, so the second read of each tile hits; capacity 1 is enough.
    heads = [(np.array([0, 0]), np.array([1, 1]))]
    orders = [np.arange(2)]
    assert l2.simulate(heads, orders, sms=2, cluster=1, group=1, capacity=1) == (4, 2, 2)
    # One SM: the second slice runs after the first; with capacity 1 tile 0 was evicted by
    # tile 1, with capacity 2 both hit.
    assert l2.simulate(heads, orders, sms=1, cluster=1, group=1, capacity=1) == (4, 4, 4)
    assert l2.simulate(heads, orders, sms=1, cluster=1, group=1, capacity=2) == (4, 2, 4)
    # Two query heads: each tile twice a slice, as distinct entries.
    assert l2.simulate(heads, orders, sms=2, cluster=1, group=2, capacity=4) == (8, 4, 4)


def test_balanced_orders():
    """Every program runs right after every other one equally often (a Williams design), each
    order a permutation: no program always inherits the same predecessor's heat."""
    import sparsek_benchmark

    for n in range(1, 8):
        orders = sparsek_benchmark.balanced_orders(n)
        assert len(orders) == (n if n % 2 == 0 else 2 * n)
        follows = {}
        for order in orders:
            assert sorted(order) == list(range(n))
            for a, b in zip(order, order[1:]):
                follows[a, b] = follows.get((a, b), 0) + 1
        assert len(follows) == n * (n - 1) and len(set(follows.values())) <= 1


def test_band_width_matches_keys_per_row():
    """--band's sliding window: its rows attend as many keys on average as asked (to within
    the rounding of the width), and it never passes the sequence."""
    import sparsek_benchmark

    for seq, keys_per_row in [(32768, 4121.3), (131072, 5191.0), (8192, 2754.6), (1000, 500.5),
                              (1000, 300.2), (4096, 1.0)]:
        w = sparsek_benchmark.band_width(keys_per_row, seq)
        assert 1 <= w <= seq
        mean = sum(min(i + 1, w) for i in range(seq)) / seq
        slope = 1 - (w - 0.5) / seq  # d mean / d w
        assert abs(mean - keys_per_row) <= 0.5 * slope + 1e-9, (seq, keys_per_row, w, mean)
    assert sparsek_benchmark.band_width(999.0, 1000) == 1000  # past the causal mean
    assert sparsek_benchmark.band_width(500.5, 1000) == 1000


def test_backward_benchmark_interleaves_reps():
    """The compared programs' reps alternate in balanced orders (both see the same clocks and
    predecessors), settings apply while their program runs, and bwd is fwd+bwd minus fwd for
    each implementation."""
    import jax
    import jax.numpy as jnp
    import backward_benchmark
    import sparsek_benchmark

    calls = []

    def tagged(tag):
        def fn(x):
            jax.debug.callback(lambda: calls.append(tag))
            return x * 2.0
        return fn

    sets = [(jnp.ones(3),), (jnp.zeros(3),)]
    medians = sparsek_benchmark.time_interleaved(
        [(tagged("a"), sets, 2), (tagged("b"), sets, 1)], reps=3)
    assert len(medians) == 2 and all(t > 0 for t in medians)
    warm = ["a"] * 2 + ["b"] * 2  # each program once on both sets before the reps
    # iters x sets calls of each program, in the orders a b, then b a.
    rep = ["a"] * 4 + ["b"] * 2 + ["b"] * 2 + ["a"] * 4
    assert calls == warm + rep * 3

    seen = []

    def reads_setting(x):
        jax.debug.callback(lambda: seen.append(os.environ.get("JAX_SPARSEK_BENCH_TEST")))
        return x

    os.environ.pop("JAX_SPARSEK_BENCH_TEST", None)
    (label, env), = sparsek_benchmark.parse_variants(["JAX_SPARSEK_BENCH_TEST=7"])
    assert label == "JAX_SPARSEK_BENCH_TEST=7" and env == {"JAX_SPARSEK_BENCH_TEST": "7"}
    sparsek_benchmark.time_interleaved(
        [(reads_setting, sets[:1], 1), (reads_setting, sets[:1], 1, env)], reps=1)
    assert sorted(map(str, seen)) == ["7"] * 3 + ["None"] * 3  # warm-up and the two orders
    assert "JAX_SPARSEK_BENCH_TEST" not in os.environ

    def attn(x):
        return x * 3.0

    w_sets = [(jnp.ones(3), jnp.ones(3))]
    (fwd, both, bwd), = backward_benchmark.time_fwd_bwd([(attn, w_sets, (0,), 1)], reps=2)
    assert fwd > 0 and both > 0 and bwd == both - fwd


def test_backward_benchmark_cotangent_reaches_the_backward_uncast():
    """With w in the attention's dtype, the backward of sum(o * w) hands w itself to the
    attention's backward (no cast or multiplication in the grad program); with
    --float32-cotangent's float32 w, the program casts it first."""
    import jax
    import jax.numpy as jnp
    import backward_benchmark

    @jax.custom_vjp
    def attn(x):
        return x * 2.0

    # The backward passes its cotangent through an op of its own, so that the program
    # cannot fold it away.
    attn.defvjp(lambda x: (x * 2.0, None),
                lambda _, ct: (jax.lax.reduce_precision(ct, exponent_bits=5,
                                                        mantissa_bits=10),))
    x = jnp.ones((4, 8), jnp.float16)

    def ops(float32_cotangent):
        w = backward_benchmark.cotangent_weights(jax.random.PRNGKey(0), x.shape, x.dtype,
                                                 float32_cotangent)
        program = jax.jit(backward_benchmark.grad_program(attn, (0,)))
        hlo = program.lower(x, w).compile().as_text()
        assert "reduce-precision" in hlo
        return {op for op in ("convert", "multiply") if f"{op}(" in hlo}

    assert ops(False) == set()
    assert ops(True) == {"convert"}


def test_forward_profile_dense_specs():
    """`dense:S` and `cudnn:S` build issue 3's dense causal problem at S rows (ours and
    cuDNN's call; neither is run here)."""
    import forward_profile

    for kind in ("dense", "cudnn"):
        fn, (q, k, v), shape = forward_profile.dense_call(f"{kind}:256")
        assert q.shape == (1, 256, 32, 128) and k.shape == v.shape == (1, 256, 8, 128)
        assert str(q.dtype) == "float16" and shape.startswith(f"{kind} causal S=256")
        assert callable(fn)


_SASS = """
		Function : _Z5otherv
  /*0000*/  EXIT ;  /* 0x000000000000794d */
  /* 0x000fea0003800000 */
		Function : _ZN7sparsek30attention_bwd_dkdv_sm90_kernel
  /*9180*/  REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR46][R4.64], R152 ;  /* 0x00000098040079a6 */
  /* 0x0005e8000c10f7ae */
  /*2490*/  S2R R221, SR_TID.X ;  /* 0x0000000000dd7919 */
  /* 0x004ea20000002100 */
"""


def test_sass_waits_decodes_control_bits():
    """The dk/dv kernel's dq atomic sets read scoreboard 2, and the thread index read again at
    its loop top waits on scoreboard 2 (and sets it for its own result): the atomics of the
    step before must have read their registers (bench/NOTES.md, the producer's fence)."""
    entries = sass_waits.read_sass(_SASS.split("\n"), "attention_bwd_dkdv")
    assert [e[2].split()[0] for e in entries] == ["REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU", "S2R"]
    red, s2r = entries[0][3], entries[1][3]
    assert red["rb"] == 2 and red["wb"] is None and red["wait"] == [] and red["stall"] == 4
    assert s2r["wait"] == [2] and s2r["wb"] == 2 and s2r["rb"] is None
    assert "W:2" in sass_waits.format_line(entries[1])
    assert [e[2] for e in sass_waits.read_sass(_SASS.split("\n"), "other")] == ["EXIT"]


def test_trace_timeline_marks_every_call(tmp_path):
    """bench/trace_timeline.py on the CPU (XLA's attention): every forward and grad call is
    found by its annotation; no GPU events on the CPU."""
    import trace_timeline
    assert trace_timeline.main(["--seq", "128", "--impl", "xla", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "timeline_xla.txt").read_text()
    for i in range(trace_timeline.CALLS):
        assert f"== fwd_{i}: host" in text and f"== grad_{i}: host" in text
    assert "no trace annotation" not in text
