"""Every seed a run derives, by name: the one place their formulas live.

`seed` is the run's `seed` key; k the generation. Sampling seeds of a generation's stages are
spaced by 100 per run seed, so each stage of generation k has its own offset:

    name                          formula                      used by
    probe(seed, k)                seed * 100 + k               monitor probe (its held-out samples)
    sample(seed, k)               seed * 100 + k               sample stage's SamplingParams
    critique(seed, k)             seed * 100 + k + 1           critique requests
    revision(seed, k)             seed * 100 + k + 2           revision requests
    label_response(seed, k)       seed * 100 + k + 3           label stage: the responses compared
    label_cot(seed, k)            seed * 100 + k + 4           label stage: the labeller's reasoning
    draw(seed, k)                 seed + k                     principle draws (critique, label)
    train(seed, k)                seed + k                     TRL's seed training gen k+1
    revision_round(base, r)       base + 7919 * r              critique round r (critique, revision)
    chunk(base, i)                base * 100_003 + i           chunk i of a chunked stage
    batch(base, b)                base * 1_000_003 + b         the hf engine's batch b (torch.manual_seed)
    request(base, i)              base * 1_000_003 + i         request i of a call to a server engine (openai, vllm)
    checkpoint(seed, i)           seed + i                     selftrain-drift: checkpoint i (0: the reference)
    child(seed, i)                seed + 1 + i                 selftrain-validate: child i's probe

These are the formulas runs have always used: changing one changes every sampled text. Some
coincide on purpose or by history, and feed different random streams so never meet: probe and
sample (the probe's samples are of held-out prompts), draw and train (string-seeded draws against
torch's RNG). Within one generation the five sampling-parameter seeds differ; across generations
critique(seed, k) equals sample(seed, k + 1) (another stage, other prompts, another model).
7919 and the two larger strides are primes above any round, chunk or batch count.
"""
from __future__ import annotations

GEN_STRIDE = 100  # sampling seeds per run seed
ROUND_STRIDE = 7919
CHUNK_STRIDE = 100_003
BATCH_STRIDE = 1_000_003


def probe(seed: int, k: int) -> int:
    """The probe stage's seed for generation k."""
    return seed * GEN_STRIDE + k


def sample(seed: int, k: int) -> int:
    """The sample stage's sampling seed for generation k."""
    return seed * GEN_STRIDE + k


def critique(seed: int, k: int) -> int:
    """The critique requests' sampling seed for generation k."""
    return seed * GEN_STRIDE + k + 1


def revision(seed: int, k: int) -> int:
    """The revision requests' sampling seed for generation k."""
    return seed * GEN_STRIDE + k + 2


def label_response(seed: int, k: int) -> int:
    """The label stage's seed for the responses it compares."""
    return seed * GEN_STRIDE + k + 3


def label_cot(seed: int, k: int) -> int:
    """The label stage's seed for the labeller's chain of thought."""
    return seed * GEN_STRIDE + k + 4


def draw(seed: int, k: int) -> int:
    """The seed of generation k's principle draws (critique and label stages)."""
    return seed + k


def train(seed: int, k: int) -> int:
    """TRL's seed when generation k trains generation k+1."""
    return seed + k


def revision_round(base: int, r: int) -> int:
    """Round r's seed of a critique or revision request whose stage seed is `base`."""
    return base + ROUND_STRIDE * r


def chunk(base: int, i: int) -> int:
    """Chunk i's seed of a chunked stage whose seed is `base`: from the stage seed and i alone."""
    return base * CHUNK_STRIDE + i


def batch(base: int, b: int) -> int:
    """The torch seed of the hf engine's batch b under sampling seed `base`."""
    return base * BATCH_STRIDE + b


def request(base: int, i: int) -> int:
    """Request i's seed in a call to a server engine (openai, vllm): distinct per request and
    stable under any completion order."""
    return base * BATCH_STRIDE + i


def checkpoint(seed: int, i: int) -> int:
    """selftrain-drift: the probe seed of checkpoint i (0 is the reference)."""
    return seed + i


def child(seed: int, i: int) -> int:
    """selftrain-validate: the probe seed of child i (the reference probes with `seed` itself)."""
    return seed + 1 + i
