"""The sort-free key ranges (``block_mask.key_ranges``) against a NumPy loop over each row's segments.

The reference walks the runs of equal segment ids in Python and writes every range from its
definition (docs/kernels.md, "Block sparsity"): for GLM data (ids increasing along the row, Part A
anywhere from empty to the whole segment, padding at the end or between segments, length-1
segments) the ranges are exact; a row whose non-zero ids are not increasing (an id reused after a
gap, ids out of order) gets the conservative whole-row ranges. Lengths cross the blocked scan's
tile of 128 once (T ~ 300-700) and twice (T > 128 * 128).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_mask as bm
from test_kernels import packed_mask_inputs

NAMES = ("lo", "hi", "full_lo", "full_hi", "q_lo", "q_hi", "full_q_lo", "full_q_hi")


def reference_ranges(seg, bid, causal):
    out = {n: np.zeros(seg.shape, np.int64) for n in NAMES}
    for b in range(seg.shape[0]):
        s, d, T = seg[b], bid[b] != 0, seg.shape[1]
        runs, a = [], 0  # (start, end, id) of each run of equal ids
        for i in range(1, T + 1):
            if i == T or s[i] != s[a]:
                runs.append((a, i, int(s[a])))
                a = i
        ids = [v for _, _, v in runs if v != 0]
        increasing = all(x < y for x, y in zip(ids, ids[1:]))
        for a, e, v in runs:
            if v == 0:
                continue
            if not increasing:
                for n, val in zip(NAMES, (0, T, 0, 0, 0, T, 0, 0)):
                    out[n][b, a:e] = val
                continue
            bid_keys = [j for j in range(a, e) if d[j]]
            bid_end = 1 + bid_keys[-1] if bid_keys else 0  # 1 + last bidirectional key
            prefix_end = a  # end of the bidirectional run that opens the segment
            while prefix_end < e and d[prefix_end]:
                prefix_end += 1
            for i in range(a, e):
                if causal:
                    hi, full_hi = max(i + 1, bid_end), max(i + 1, prefix_end)
                    q_lo = a if d[i] else i
                else:
                    hi = full_hi = e
                    q_lo = a
                for n, val in zip(NAMES, (a, hi, a, full_hi, q_lo, e, q_lo, e)):
                    out[n][b, i] = val
    return out


def glm_rows(rng, batch, length, prefix):
    """Packed GLM rows; some whole segments turned into padding (padding between segments)."""
    seg, bid = packed_mask_inputs(rng, batch, length, prefix=prefix)
    drop = rng.integers(1, 8, 2)
    return np.where(np.isin(seg, drop), 0, seg), bid


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_key_ranges_equal_loop_reference(causal):
    rng = np.random.default_rng(17 + causal)
    fn = jax.jit(bm.key_ranges, static_argnames="causal")
    cases = [glm_rows(rng, 3, int(rng.integers(4, 700)), prefix=bool(k % 2)) for k in range(12)]
    cases.append(glm_rows(rng, 2, 17000, prefix=True))  # two levels of tiles
    seg, bid = glm_rows(rng, 4, 300, prefix=True)
    seg[0, 250:260] = seg[0, 5]  # an id reused after a gap
    seg[1] = np.where(seg[1] > 0, 100 - seg[1], 0)  # ids decreasing along the row
    seg[2, :3] = 0  # padding first, then GLM data: stays exact
    cases.append((seg, bid))
    cases.append((np.ones((2, 1), np.int32), np.array([[0], [1]], np.int32)))  # T = 1
    for seg, bid in cases:
        got = fn(jnp.asarray(seg), jnp.asarray(bid), causal=causal)
        want = reference_ranges(seg, bid, causal)
        for n in NAMES:
            np.testing.assert_array_equal(np.asarray(got[n]), want[n], err_msg=f"{n} T={seg.shape[1]}")
