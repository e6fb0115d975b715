"""Contamination guard: no probe item may reach training data.

Run before every training stage over the SFT and preference datasets. A training text is
contaminated when it equals a probe text after normalisation, or when it contains most of a
probe text's word 5-grams (a near-duplicate or an embedded copy). Probe texts shorter than
five words are matched exactly only.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from selftrain import UserError
from selftrain.run.layout import GenDir

SHINGLE = 5
CONTAINMENT = 0.6  # share of a probe text's 5-grams found in one training text


def _norm(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _shingles(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


class Guard:
    def __init__(self, probe_texts: list[str]):
        self.exact: dict[str, str] = {}
        self.index: dict[tuple, set[int]] = defaultdict(set)
        self.sizes: list[int] = []
        self.texts: list[str] = []
        for t in probe_texts:
            words = _norm(t)
            self.exact[" ".join(words)] = t
            sh = _shingles(words)
            if sh:
                pid = len(self.texts)
                self.texts.append(t)
                self.sizes.append(len(sh))
                for s in sh:
                    self.index[s].add(pid)

    def match(self, text: str) -> str | None:
        """The probe text that `text` copies, or None."""
        words = _norm(text)
        if " ".join(words) in self.exact:
            return self.exact[" ".join(words)]
        hits: dict[int, int] = defaultdict(int)
        for s in _shingles(words):
            for pid in self.index.get(s, ()):
                hits[pid] += 1
        for pid, n in hits.items():
            if n / self.sizes[pid] >= CONTAINMENT:
                return self.texts[pid]
        return None


def training_texts(data_dir: Path) -> list[tuple[str, str]]:
    """(where, text) for every message of the SFT and preference datasets in `data_dir`."""
    from datasets import load_from_disk

    out = []
    for name, cols in (("sft", ("messages",)), ("preference", ("prompt", "chosen", "rejected"))):
        path = Path(data_dir) / name
        if not (path / "dataset_info.json").is_file():
            continue
        ds = load_from_disk(str(path))
        for i, row in enumerate(ds):
            for col in cols:
                for msg in row[col]:
                    out.append((f"{name}[{i}].{col}", msg["content"]))
    return out


def check(data_dir: Path, probe_texts: list[str]) -> int:
    """Raise if any training text copies a probe item; return the number of texts checked."""
    guard = Guard(probe_texts)
    texts = training_texts(data_dir)
    for where, text in texts:
        hit = guard.match(text)
        if hit is not None:
            raise UserError(f"probe item found in training data ({Path(data_dir)}/{where}): "
                            f"{hit[:80]!r}; probe items must never be trained on")
    return len(texts)


def outputs(gen: GenDir, cfg) -> list[Path]:
    """The guard writes nothing: it only refuses."""
    return []


def run_guard(gen: GenDir, cfg, probe_texts: list[str]) -> dict:
    """The guard stage: check the data training will read (the screen's copy under screen=drop)."""
    return {"texts_checked": check(gen.train_data(cfg.monitor.screen), probe_texts), "probe_texts": len(probe_texts)}
