"""KV caches for batched decoding and scoring: which caches can be reshaped row by row, a shared
prefix's cache widened to a batch, a batch cache laid out [shared prefix][padding][own tokens],
and a cache layer that decodes into buffers reserved up front (`ReservedLayer`)."""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (keys, values) [rows, heads, tokens, head dim]


def plain_cache(cache) -> bool:
    """A cache of plain DynamicLayers, whose rows can be expanded, selected and copied."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def expanded_cache(kv: KV, rows: int, config) -> DynamicCache:
    """A shared prefix's per-layer (keys, values), one row each, as a cache of `rows` rows.
    expand() makes views; the cache concatenates new keys onto them, never writing in place."""
    return DynamicCache([(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in kv], config=config)


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes: layers x (keys + values) x KV heads x head dim x dtype size."""
    c = model.config
    c = getattr(c, "text_config", None) or c
    heads = getattr(c, "num_attention_heads", 1)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return int(c.num_hidden_layers * 2 * kv_heads * head_dim * next(model.parameters()).element_size())


class PaddedKV:
    """Per-layer keys and values of a batch of `rows` rows laid out [shared prefix][padding][own
    tokens], each row's own tokens ending at column len(prefix) + `width`, with `reserve` empty
    columns after that for decoding. Filled block by block (`place`), so a caller can free each
    block's cache before computing the next; columns never placed stay zero and must be masked.
    Without a prefix the buffers are made at the first `place` (`layers` is empty until then)."""

    def __init__(self, rows: int, prefix: KV | None, width: int, reserve: int = 0):
        self.rows, self.width, self.reserve = rows, width, reserve
        self.n_prefix = prefix[0][0].shape[2] if prefix else 0
        self.layers: KV = []
        if prefix:
            self._allocate(prefix)
            for (k, v), (K, V) in zip(prefix, self.layers):
                K[:, :, :self.n_prefix], V[:, :, :self.n_prefix] = k, v

    def _allocate(self, like: KV) -> None:
        cols = self.n_prefix + self.width + self.reserve
        self.layers = [(k.new_zeros(self.rows, k.shape[1], cols, k.shape[3]),
                        v.new_zeros(self.rows, v.shape[1], cols, v.shape[3])) for k, v in like]

    def place(self, rows, own: KV) -> None:
        """Rows `rows` (indices) get `own`, per layer (keys, values) of their own tokens only (no
        prefix), right-aligned at the end of the filled part."""
        if not self.layers:
            self._allocate(own)
        end = self.n_prefix + self.width
        for (k, v), (K, V) in zip(own, self.layers):
            m = k.shape[2]
            K[rows, :, end - m:end], V[rows, :, end - m:end] = k, v


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers reserved up front for the whole
    generation. DynamicLayer concatenates every new token onto its cache, copying all of it, a
    sizeable share of a CPU decoding step at large batches. Here each step writes its token in
    place and attention reads a view of the filled part; a buffer that runs out is doubled."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._k, self._v, self._n = keys, values, length
        self.device, self.is_initialized = keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]

    def lazy_initialization(self, key_states, value_states) -> None:  # the buffers exist already
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        n, m = self._n, self._n + key_states.shape[-2]
        if m > self._k.shape[-2]:
            grow = max(m, 2 * self._k.shape[-2]) - self._k.shape[-2]
            self._k = torch.cat([self._k, self._k.new_zeros(*self._k.shape[:2], grow, self._k.shape[3])], dim=-2)
            self._v = torch.cat([self._v, self._v.new_zeros(*self._v.shape[:2], grow, self._v.shape[3])], dim=-2)
        self._k[:, :, n:m], self._v[:, :, n:m] = key_states, value_states
        self._n = m
        self._views()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            self._n = max(0, self._n + tokens_to_remove)
            self._views()
        else:
            super().crop(tokens_to_remove)  # its error for the legacy positive form

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
        self._views()


def reserved_cache(kv: KV, length: int) -> DynamicCache:
    """A cache of ReservedLayers over buffers whose first `length` columns are filled."""
    cache = DynamicCache()
    cache.layers = [ReservedLayer(K, V, length) for K, V in kv]
    return cache
