"""The small batching kernels the engine and the monitor share: pad id, padding, shared prefix,
and the batch KV layout [shared prefix][padding][own tokens]."""
from types import SimpleNamespace

import torch

from selftrain.kernels.batching import left_padded, pad_id, padded_after_prefix, shared_prefix_length
from selftrain.kernels.kv_cache import PaddedKV


def test_pad_id_falls_back_to_eos():
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2


def test_left_padding_and_rows_after_a_prefix():
    ids, mask, pos = left_padded([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    rows, m = padded_after_prefix([[5, 6], [7]], 2, 0)
    assert rows == [[5, 6], [0, 7]] and m == [[1, 1, 1, 1], [1, 1, 0, 1]]


def test_shared_prefix_leaves_every_row_a_token():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert shared_prefix_length([[1]]) == 0


def test_padded_kv_lays_out_prefix_padding_and_own_tokens():
    prefix = [(torch.full((1, 2, 3, 4), 1.0), torch.full((1, 2, 3, 4), -1.0))]
    batch = PaddedKV(3, prefix, width=4, reserve=2)
    batch.place(torch.tensor([0, 2]), [(torch.full((2, 2, 4, 4), 2.0), torch.full((2, 2, 4, 4), -2.0))])
    batch.place([1], [(torch.full((1, 2, 1, 4), 3.0), torch.full((1, 2, 1, 4), -3.0))])
    K, V = batch.layers[0]
    assert K.shape == (3, 2, 3 + 4 + 2, 4)
    assert (K[:, :, :3] == 1).all() and (V[:, :, :3] == -1).all()
    assert (K[[0, 2], :, 3:7] == 2).all() and (K[:, :, 7:] == 0).all()
    assert (K[1, :, 3:6] == 0).all() and (K[1, :, 6] == 3).all() and (V[1, :, 6] == -3).all()
    empty = PaddedKV(2, None, width=3)
    assert empty.layers == []  # made at the first place
    empty.place([1], [(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))])
    assert empty.layers[0][0].shape == (2, 1, 3, 4) and empty.layers[0][0][1, :, 1:].eq(1).all()
