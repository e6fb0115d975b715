"""The stages of one generation: sample, critique, data, label, screen, guard, train.

The contract every stage follows (selftrain.run.loop calls them in this order):

    run_<stage>(gen: GenDir, cfg, ...) -> dict        the counts recorded for the stage
    outputs(gen, cfg) -> list[Path]                     what it writes (hashed when it is done)

- `gen` (selftrain.run.layout.GenDir) names every file of generation k. A stage reads its inputs
  there and writes its outputs there, itself, atomically; it writes nothing `outputs` does not name.
  The train stage alone writes outside its own folder: gen-(k+1)/model (`GenDir.child_model`),
  recorded in gen-k's manifest, since generation k is what produces it.
- The further arguments are what a stage cannot read from disk: a sampler, a loaded model, the
  constitution, the probe texts. Seeds come from `cfg.seed` and `gen.k`, by name
  (selftrain.run.seeds).
- The returned dict is stored as the stage's `counts` in gen-k/manifest.json, keys in the order
  the stage builds them. A result that leaves nothing to train on is a one-line UserError.
- The loop, not the stage, decides whether a stage runs (the manifest says which are done), opens
  its manifest entry (records.Manifest.stage), hashes `outputs`, and loads and releases models.
- Each output has one owner: data/sft is the data stage's; data/preference is the data stage's
  revision pairs, or the label stage's pairs when a label stage runs (then data does not write it).
"""
from __future__ import annotations


def labels(cfg) -> bool:
    """The label stage runs when DPO trains on AI-feedback or user-supplied preferences."""
    from selftrain.stages.train import uses_dpo

    return cfg.preferences.source in ("ai_feedback", "dataset") and uses_dpo(cfg.train.method)


def revisions_used(cfg) -> bool:
    """Whether training reads the critique stage's revisions: SFT does, and DPO on revision pairs.
    DPO alone on labelled pairs does not, so its generations skip the critique and data stages
    (on the default experiment, critique was about half of a generation's time)."""
    return not (labels(cfg) and cfg.train.method == "dpo")


def sampling(cfg, max_new_tokens: int, seed: int):
    """The engine's SamplingParams from the `sampler` keys, with a stage's own length and seed."""
    from selftrain.engines.base import SamplingParams

    s = cfg.sampler
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                          repetition_penalty=s.repetition_penalty, seed=seed)
