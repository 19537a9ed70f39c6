"""The GLM objectives (DESIGN.md §4) on random documents, against an independent decoder and statistics."""
import math

import numpy as np
import pytest

from glmjax.data.blank_infilling import OBJECTIVES, ObjectiveSpec, document_examples

MASK, SMASK, GMASK, SOP, EOP = 3, 4, 5, 6, 7
VOCAB = 300


def _spec(seq_len=128, weights=(0.25, 0.25, 0.25, 0.25), seed=0, **kw):
    rng = np.random.default_rng(seed)
    sentence_end = rng.random(VOCAB) < 0.08
    sentence_end[:8] = False
    return ObjectiveSpec(seq_len=seq_len, weights=weights, mask_ids=(MASK, SMASK, GMASK), sop=SOP, eop=EOP,
                         sentence_end=sentence_end, **kw)


def _doc(rng, n):
    return rng.integers(8, VOCAB, size=n).astype(np.int32)


def decode(ex, sop=SOP):
    """Independent reference: split an example into Part A and spans; rebuild the original chunk.

    Returns (chunk, spans) where spans is a list of (mask position in Part A, span tokens).
    """
    tokens = ex["tokens"]
    a = int(ex["bidirectional"].sum())
    assert (ex["bidirectional"][:a] == 1).all() and (ex["bidirectional"][a:] == 0).all()
    part_a = list(tokens[:a])
    spans = []
    i = a
    while i < len(tokens):
        assert tokens[i] == sop
        j = i + 1
        while j < len(tokens) and tokens[j] != sop:
            j += 1
        spans.append((int(ex["positions"][i]), list(tokens[i + 1:j])))
        i = j
    by_pos = dict(spans)
    chunk = []
    for p, t in enumerate(part_a):
        chunk.extend(by_pos[p] if p in by_pos else [t])
    return np.array(chunk), spans


def check_infill_layout(ex, seq_len):
    """Every feature exactly as DESIGN.md §4 says, for one blank-infilling example."""
    tokens, targets, pos, block = ex["tokens"], ex["targets"], ex["positions"], ex["block_positions"]
    assert len(tokens) <= seq_len
    a = int(ex["bidirectional"].sum())
    np.testing.assert_array_equal(pos[:a], np.arange(a))
    assert (block[:a] == 0).all() and (targets[:a] == 0).all()
    starts = list(np.flatnonzero(tokens[a:] == SOP) + a) + [len(tokens)]
    assert starts[0] == a
    for s, e in zip(starts[:-1], starts[1:]):
        l = e - s - 1
        np.testing.assert_array_equal(block[s:e], np.arange(1, l + 2))
        assert (pos[s:e] == pos[s]).all() and tokens[pos[s]] in (MASK, SMASK, GMASK)
        np.testing.assert_array_equal(targets[s:e - 1], tokens[s + 1:e])  # next token...
        assert targets[e - 1] == EOP  # ...and <eop> last
    # each mask token in Part A has exactly one span
    assert sorted(pos[s] for s in starts[:-1]) == list(np.flatnonzero(np.isin(tokens[:a], [MASK, SMASK, GMASK])))


def _all_examples(spec, num_docs, seed, lengths=(1, 700)):
    rng = np.random.default_rng(seed)
    for d in range(num_docs):
        doc = _doc(rng, int(rng.integers(*lengths)))
        yield doc, list(document_examples(doc, spec, np.random.default_rng([seed, d])))


@pytest.mark.parametrize("seq_len", [32, 128, 257])
def test_chunks_rebuild_the_document_and_layout_is_exact(seq_len):
    spec = _spec(seq_len)
    for doc, exs in _all_examples(spec, 60, seed=seq_len):
        rebuilt, pos = [], 0
        for obj, ex in exs:
            assert len(ex["tokens"]) <= seq_len
            assert all(len(v) == len(ex["tokens"]) for v in ex.values())
            if OBJECTIVES[obj] == "causal":
                np.testing.assert_array_equal(ex["targets"][:-1], ex["tokens"][1:])
                np.testing.assert_array_equal(ex["positions"], np.arange(len(ex["tokens"])))
                assert not ex["bidirectional"].any() and not ex["block_positions"].any()
                chunk = np.concatenate([ex["tokens"], ex["targets"][-1:]])
                np.testing.assert_array_equal(chunk, doc[pos:pos + len(chunk)])
                pos += len(chunk) - 1
            else:
                check_infill_layout(ex, seq_len)
                chunk, spans = decode(ex)
                mask_id = (MASK, SMASK, GMASK)[obj - 1]
                assert all(ex["tokens"][p] == mask_id for p, _ in spans)
                np.testing.assert_array_equal(chunk, doc[pos:pos + len(chunk)])
                pos += len(chunk)
            rebuilt.append(pos)
        assert len(doc) - pos <= 1  # everything but a final lone token is used


def test_same_rng_same_examples():
    spec = _spec()
    doc = _doc(np.random.default_rng(3), 900)
    a = list(document_examples(doc, spec, np.random.default_rng(7)))
    b = list(document_examples(doc, spec, np.random.default_rng(7)))
    c = list(document_examples(doc, spec, np.random.default_rng(8)))
    assert [o for o, _ in a] == [o for o, _ in b]
    for (_, x), (_, y) in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for (_, x), (_, y) in zip(a, c))


def test_mask_coverage_and_span_lengths():
    spec = _spec(weights=(0, 1, 0, 0))
    covered, lengths, sizes = [], [], []
    for doc, exs in _all_examples(spec, 150, seed=11, lengths=(400, 2000)):
        for _, ex in exs:
            chunk, spans = decode(ex)
            if len(chunk) < spec.chunk_len("mask"):
                continue  # a document's short tail
            covered.append(sum(len(s) for _, s in spans))
            sizes.append(len(chunk))
            lengths += [len(s) for _, s in spans]
    coverage = sum(covered) / sum(sizes)
    assert abs(coverage - 0.15) <= 0.02, coverage
    assert min(c / n for c, n in zip(covered, sizes)) >= 0.15  # drawn until >= 15%
    # max(1, Poisson(3)) has mean 3 + e^-3 (the span crossing 15% is a little longer on average)
    assert 2.8 <= np.mean(lengths) <= 3.3, np.mean(lengths)
    assert len(lengths) > 2000


def test_smask_spans_are_whole_sentences():
    spec = _spec(weights=(0, 0, 1, 0))
    checked = 0
    for doc, exs in _all_examples(spec, 80, seed=5, lengths=(300, 900)):
        for _, ex in exs:
            chunk, spans = decode(ex)
            is_end = spec.sentence_end[chunk]
            bounds = np.concatenate([[0], np.flatnonzero(is_end[:-1]) + 1, [len(chunk)]])
            if np.diff(bounds).min() > len(chunk) // 2:
                continue  # no sentence short enough: documented fallback to Poisson spans
            a_tokens = ex["tokens"][: int(ex["bidirectional"].sum())]
            offset = 0  # walk Part A, mapping each mask to its span's start in the chunk
            starts = {}
            for p, t in enumerate(a_tokens):
                if t == SMASK:
                    starts[p] = offset
                    offset += len(dict(spans)[p])
                else:
                    offset += 1
            total = 0
            for p, s in spans:
                st, en = starts[p], starts[p] + len(s)
                assert st == 0 or is_end[st - 1]  # starts a sentence
                assert en == len(chunk) or is_end[en - 1]  # ends one
                total += len(s)
            if len(chunk) >= 40:
                assert total >= math.ceil(0.15 * len(chunk))
                checked += 1
    assert checked > 100


def test_gmask_suffix_ratio_is_uniform_over_half_to_all():
    spec = _spec(weights=(0, 0, 0, 1))
    ratios = []
    for doc, exs in _all_examples(spec, 400, seed=2, lengths=(200, 1200)):
        for _, ex in exs:
            chunk, spans = decode(ex)
            if len(chunk) < spec.chunk_len("gmask"):
                continue
            assert len(spans) == 1 and ex["tokens"][spans[0][0]] == GMASK
            a = int(ex["bidirectional"].sum())
            assert spans[0][0] == a - 1  # the suffix: [gMASK] ends Part A
            ratios.append(len(spans[0][1]) / len(chunk))
    ratios = np.array(ratios)
    assert ratios.min() >= 0.5 and ratios.max() <= 1.0 and len(ratios) > 1500
    hist = np.histogram(ratios, bins=5, range=(0.5, 1.0 + 1e-9))[0] / len(ratios)
    np.testing.assert_allclose(hist, 0.2, atol=0.035)
    assert abs(ratios.mean() - 0.75) < 0.01


@pytest.mark.parametrize("weights", [(0.0, 0.3, 0.0, 0.7), (0.1, 0.2, 0.3, 0.4)])
def test_objective_mix_matches_weights(weights):
    spec = _spec(weights=weights)
    counts = np.zeros(4)
    for _, exs in _all_examples(spec, 300, seed=9, lengths=(300, 1500)):
        for obj, _ in exs:
            counts[obj] += 1
    freq = counts / counts.sum()
    n = counts.sum()
    assert n > 1500
    # 4 standard deviations of a multinomial share
    np.testing.assert_allclose(freq, weights, atol=4 * math.sqrt(0.25 / n))


def test_bad_objective_settings_are_refused():
    with pytest.raises(ValueError, match="weights"):
        _spec(weights=(0, 0, 0, 0))
    with pytest.raises(ValueError, match="gmask"):
        _spec(gmask_min_ratio=0.9, gmask_max_ratio=0.5)
