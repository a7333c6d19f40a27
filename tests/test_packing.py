"""Packed rows: a document's requests as one prefix tree, each request reading what HFLM reads."""

from __future__ import annotations

import pytest
import torch

from lm_eval_cola.packing import PackedBatch, pack

CONTEXT = [5, 6, 7, 8]


def test_a_shared_context_is_one_set_of_nodes():
    row = pack([(CONTEXT, [9]), (CONTEXT, [10, 11]), (CONTEXT, [10, 12])], max_length=64)
    # context 5 6 7 8 once; 10 once for the two continuations that start with it
    assert sorted(row.tokens) == [5, 6, 7, 8, 10]
    assert len(row) == 5 < 4 + 4 + 5 + 5
    by_token = dict(zip(row.tokens, row.positions, strict=True))
    assert by_token == {5: 0, 6: 1, 7: 2, 8: 3, 10: 4}


def test_reads_point_at_the_logits_hflm_reads():
    """HFLM scores continuation token k from the logits at input position len(context)+k-1."""
    row = pack([(CONTEXT, [9]), (CONTEXT, [10, 11])], max_length=64)
    last_context = row.tokens.index(8)
    first, second = row.reads
    assert first.nodes == (last_context,) and first.targets == (9,)
    assert second.nodes == (last_context, row.tokens.index(10)) and second.targets == (10, 11)
    read = {node for r in row.reads for node in r.nodes}
    assert read == set(range(row.n_unread, len(row))), "read nodes form the row's suffix"


def test_parents_and_ancestors_follow_each_request():
    row = pack([([1, 2, 3], [4]), ([1, 2, 9], [4])], max_length=64)
    ancestors = row.ancestors()
    for node, parent in enumerate(row.parents):
        expected = {node} | (
            {*ancestors[parent].nonzero().flatten().tolist()} if parent >= 0 else set()
        )
        assert set(ancestors[node].nonzero().flatten().tolist()) == expected
    three, nine = row.tokens.index(3), row.tokens.index(9)
    assert not ancestors[three, nine] and not ancestors[nine, three], "siblings never attend"


def test_long_requests_are_truncated_from_the_left_like_hflm():
    row = pack([(list(range(1, 11)), [11, 12])], max_length=6)
    # HFLM's input: (context + continuation)[-(max_length + 1):][:-1]
    assert row.tokens[: row.n_unread] + row.tokens[row.n_unread :] == [6, 7, 8, 9, 10, 11]
    assert row.positions == [0, 1, 2, 3, 4, 5]
    assert row.reads[0].targets == (11, 12)


def test_a_batch_left_pads_rows_and_masks_padding_to_itself():
    short = pack([([1, 2], [3])], max_length=64)
    long = pack([([1, 2, 3, 4, 5], [6, 7])], max_length=64)
    batch = PackedBatch([short, long], pad_id=0, device="cpu")
    assert batch.input_ids.tolist()[0] == [0, 0, 0, 0, 1, 2]
    mask = batch.mask(None, torch.float32)
    assert mask.shape == (2, 1, 6, 6)
    allowed = mask[0, 0] == 0
    assert allowed[0].tolist() == [True, False, False, False, False, False]
    assert allowed[5].tolist() == [False, False, False, False, True, True]
    window = batch.mask(2, torch.float32)[1, 0] == 0
    assert window[5].tolist() == [False, False, False, False, True, True]
    assert batch.keep == max(short.n_read, long.n_read)


def test_requests_need_a_context_and_a_continuation():
    with pytest.raises(ValueError, match="needs a context and a continuation"):
        pack([([], [1])], max_length=8)
