"""Temperature and top-p (nucleus) sampling that looks for the nucleus among the top k tokens
before sorting the whole vocabulary; the kept set and the draw's distribution are transformers'."""
from __future__ import annotations

import torch


class NucleusSampling:
    """Temperature and top-p sampling: `pick` for our decoding loop, or as a logits processor,
    after which `generate` picks greedily.

    transformers' own sampling sorts the whole vocabulary for top-p and draws with
    `torch.multinomial` over all of it, a large share of a CPU decoding step for a 49k-token
    vocabulary. Here the nucleus is looked for among the `k` most likely tokens (`torch.topk`),
    then among the top 8k for rows whose nucleus is larger, then in the whole
    sorted vocabulary for rows flatter still, and the draw is among the nucleus alone: one
    uniform number per row, inverted through the row's cumulative kept mass. As a processor it
    returns 0 for the drawn token and -inf elsewhere, so greedy selection takes it.
    The kept set is the one transformers' TopPLogitsWarper keeps and the draw has the same
    distribution (tests/test_sample.py); the random stream differs, so a seed gives other text
    than transformers' sampling would, and the same text on every rerun.
    """

    def __init__(self, temperature: float, top_p: float, k: int = 256):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"NucleusSampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        self.temperature, self.top_p, self.k = temperature, top_p, k
        self.widened = 0  # rows whose nucleus did not fit in the top k (for tests and benchmarks)
        self.sorted_rows = 0  # rows whose nucleus did not fit in the top 8k either: sorted whole

    def _draw(self, probs: torch.Tensor, idx: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Rows of descending probabilities and their token ids: one draw from each row's nucleus,
        by inverting its cumulative kept mass at the row's uniform number `u`."""
        before = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each one
        keep = before < self.top_p
        keep[:, 0] = True
        mass = (probs * keep).cumsum(-1)
        j = torch.searchsorted(mass, (u * mass[:, -1])[:, None], right=True)
        j = torch.minimum(j, keep.sum(-1, keepdim=True) - 1)  # rounding at u ~ 1 stays in the nucleus
        return idx.gather(1, j).squeeze(1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, self.pick(scores)[:, None], 0.0)
        return out

    def pick(self, scores: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """One token id per row of logits, drawn from its nucleus with the row's uniform number in
        `u` (default: `torch.rand` per row). One number per row, whatever level the row's nucleus
        is found at, so a row's draw does not depend on the other rows."""
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        n, vocab = probs.shape
        u = torch.rand(n, device=scores.device) if u is None else u
        chosen = torch.empty(n, dtype=torch.long, device=scores.device)
        rows = None  # the rows still without a draw (None: all of them)
        # On a GPU the whole vocabulary sorts in about a millisecond, and each level below would
        # wait on the device (`fits.any()`, boolean indexing): there every row is sorted whole.
        if self.top_p < 1 and scores.device.type == "cpu":
            # The top k, then the top 8k, then the whole sorted vocabulary: sorting a flat row
            # costs several times its top 2048.
            for k in (self.k, 8 * self.k):
                if k >= vocab:
                    break
                top, idx = torch.topk(probs if rows is None else probs[rows], k, dim=-1)
                # a row fits when its top k hold top_p of the mass: then its nucleus is among them
                fits = top.sum(-1) >= self.top_p
                ids = torch.arange(n, device=scores.device) if rows is None else rows
                if fits.any():
                    chosen[ids[fits]] = self._draw(top[fits], idx[fits], u[ids[fits]])
                rows = ids[~fits]
                if k == self.k:
                    self.widened += len(rows)
                if len(rows) == 0:
                    break
        if rows is None:
            self.sorted_rows += n
            full, fidx = torch.sort(probs, dim=-1, descending=True)
            return self._draw(full, fidx, u)
        if len(rows):
            self.sorted_rows += len(rows)
            full, fidx = torch.sort(probs[rows], dim=-1, descending=True)
            chosen[rows] = self._draw(full, fidx, u[rows])
        return chosen
