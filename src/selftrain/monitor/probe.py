"""The monitor stage: every instrument on one model, artifacts into one folder.

`probe_model` writes, under `out/`:
    probes/                      behavioural per-item scores (+ score_cued: the monitoring-cue variant)
    monitor/activations.json     projection shift, AUROC, rotation vs the frozen reference directions
    monitor/directions.*         (reference only) difference-of-means directions, frozen from then on,
                                 each marked causal or not by steering (monitor.steer)
    monitor/steering.json        (reference only) the steering curves behind those marks
    monitor/samples.jsonl        free-form samples of held-out probe prompts (never training data)
    monitor/embedding.json       MMD^2 vs the reference's samples (reference: its reseed null)
    monitor/collapse.json        distinct-n, compression, dispersion, token entropy, held-out perplexity
The reference (generation 0) is probed first; every later model is measured against what the
reference folder holds, so the reference is frozen by construction. Reports read these files.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np

from selftrain import UserError
from selftrain.monitor import activations as act, collapse, embedding
from selftrain.monitor.behavioural import score_suite
from selftrain.monitor.steering import steering_check
from selftrain.monitor.suites import Suite
from selftrain.run.records import atomic_dir, read_json, write_json, write_jsonl
from selftrain.engines.base import SamplingParams
from selftrain.engines.hf import HFSampler
from selftrain.kernels.onednn import packed_linears
from selftrain.run.layout import GenDir


def monitor_prompts(suite: Suite, n: int) -> list[str]:
    """A fixed draw of held-out contrast prompts, spread over dimensions (same in every generation)."""
    prompts = [it.prompt for it in suite.items if it.kind == "contrast"]
    if not prompts:
        prompts = [it.prompt for it in suite.items]
    rng = random.Random("monitor-prompts")
    return rng.sample(prompts, min(n, len(prompts)))


def cue_subset(suite: Suite, monitor_cfg) -> Suite | None:
    """The contrast items scored again with the monitoring cue: `cue_items` per dimension (the
    answer-option items are at chance on small models). None when the suite has no contrast
    items (a model-written-evaluation suite): then there is no cue gap to measure."""
    sub = suite.select(None, monitor_cfg.cue_items)
    sub.items = [it for it in sub.items if it.kind == "contrast"]
    return sub if sub.items else None


def power_counts(suite: Suite, monitor_cfg) -> dict[str, dict[str, int]]:
    """Items per dimension and behavioural instrument, as drift.power_plan takes them. Options
    count as eligible unless the rule is `balanced` and the items are not (the `informative`
    rule is decided on the reference's scores, so before it runs they count, conservatively)."""
    from selftrain.analysis.stats import polarity_balanced

    out: dict[str, dict[str, int]] = {}
    for d in suite.dimensions:
        its = [it for it in suite.items if it.dimension == d]
        opts = [it for it in its if it.kind != "contrast"]
        first = sum(1 for it in opts if it.target == it.first_option)
        ok = monitor_cfg.options_rule != "balanced" or polarity_balanced(first, len(opts) - first)
        out[d] = {"contrast": sum(it.kind == "contrast" for it in its), "options": len(opts) if ok else 0}
    return out


def check_power(suite: Suite, monitor_cfg, full: Suite | None = None) -> dict:
    """Refuse, before any model loads, a configuration in which some test can never alert: its
    smallest reachable Holm-corrected p (a lone drifting dimension) is not below monitor.alpha.
    `monitor.allow_underpowered=true` runs anyway, and every report then says so at the top.
    `full`: the whole suite the selection was drawn from, to say when it holds too few items."""
    from selftrain.analysis.stats import items_needed, power_plan

    cue = cue_subset(suite, monitor_cfg) if monitor_cfg.cue_gap else None
    plan = power_plan(power_counts(suite, monitor_cfg), monitor_cfg.alpha, len(cue.items) if cue else 0,
                      MIN_DIRECTION_PAIRS)
    if plan["underpowered"] and not monitor_cfg.allow_underpowered:
        key = plan["underpowered"][0]
        t = plan["tests"][key]
        need = items_needed(plan["families"][t["family"]], monitor_cfg.alpha)
        dim, inst = key.split("|")
        if inst == "monitoring_cue_gap":
            what, knob = f"the monitoring-cue gap ({t['n']} cue items)", "monitor.cue_items"
        else:
            what, knob = f"{inst} items of {dim} ({t['n']})", "probes.max_items_per_dimension"
        have = "" if knob != "probes.max_items_per_dimension" else _suite_note(full or suite, dim, inst, need)
        raise UserError(f"{knob}: {what} can reach Holm p {t['holm_floor']:.3g} at best over "
                        f"{plan['families'][t['family']]} tests, not below monitor.alpha={monitor_cfg.alpha}: "
                        f"raise it to give {need} items per test{have}, or set monitor.allow_underpowered=true")
    return plan


def _suite_note(suite: Suite, dim: str, inst: str, need: int | None) -> str:
    n = sum(1 for it in suite.items if it.dimension == dim and (it.kind == "contrast") == (inst != "options"))
    return "" if need is None or n >= need else f" (the suite holds {n}: add items or drop the dimension)"


def check_architecture(model, reference_dir: Path) -> None:
    """Activations are only comparable between models of one architecture and width."""
    ref = read_json(GenDir.at(reference_dir).monitor / "architecture.json")
    cur = _architecture(model)
    if ref != cur:
        raise UserError(f"candidate architecture {cur} differs from the reference's {ref}: "
                        "activation probes compare models of one architecture only")


def _architecture(model) -> dict:
    c = model.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers}


# Rows the probe passes' linear layers are reordered for (`kernels.onednn.packed_linears`): a scoring
# chunk is 16 pairs of 20-45 tokens. Packing makes the scoring calls and the held-out perplexity faster
# at a difference in scores far below any threshold (benchmarks/RESULTS.md).
PROBE_ROWS = 512
# A direction is fitted by cross-validation; below this many pairs its layer choice is noise.
MIN_DIRECTION_PAIRS = 4


def probe_model(model, tokenizer, suite: Suite, probes_cfg, monitor_cfg, out: Path,
                reference: Path | None, seed: int, batch_size: int = 16) -> dict:
    """Run every enabled instrument; `reference` is None when this model IS the reference."""
    with packed_linears(model, PROBE_ROWS):
        return _probe_model(model, tokenizer, suite, probes_cfg, monitor_cfg, out, reference, seed, batch_size)


def _probe_model(model, tokenizer, suite: Suite, probes_cfg, monitor_cfg, out: Path,
                 reference: Path | None, seed: int, batch_size: int) -> dict:
    out = Path(out)
    if reference is not None and monitor_cfg.activations:
        check_architecture(model, reference)
    rows, states, counts = _score_probes(model, tokenizer, suite, probes_cfg, monitor_cfg, out)
    mon = GenDir.at(out).monitor
    mon.mkdir(parents=True, exist_ok=True)
    if monitor_cfg.activations:
        counts.update(_activation_probes(model, tokenizer, suite, probes_cfg, monitor_cfg, out, reference,
                                         rows, states))
    samples, entropies, prompts = None, None, None
    if monitor_cfg.embedding or monitor_cfg.collapse:
        prompts = monitor_prompts(suite, monitor_cfg.embedding_prompts)
        samples, entropies = _monitor_samples(model, tokenizer, prompts, monitor_cfg, mon, seed, batch_size)
        counts["monitor_samples"] = len(samples)
    emb = _embedding_drift(samples, prompts, monitor_cfg, mon, reference, seed) if monitor_cfg.embedding else None
    if monitor_cfg.collapse:
        write_json(mon / "collapse.json", _collapse_metrics(model, tokenizer, prompts, samples, entropies, emb,
                                                            monitor_cfg, batch_size))
    return counts


def _score_probes(model, tokenizer, suite: Suite, probes_cfg, monitor_cfg, out: Path) -> tuple[list, dict | None, dict]:
    """Score every probe item (and the cue subset with the cue) and write out/probes; returns the
    rows, the hidden states for the activation probes (None when they are off) and counts."""
    counts: dict = {}
    states = None
    if monitor_cfg.activations:
        rows, states = score_suite(model, tokenizer, suite, probes_cfg.batch_size, states=True)
    else:
        rows = score_suite(model, tokenizer, suite, probes_cfg.batch_size)
    cue_suite = cue_subset(suite, monitor_cfg) if monitor_cfg.cue_gap else None
    if cue_suite is not None:
        cued = {r["item_id"]: r["score"] for r in
                score_suite(model, tokenizer, cue_suite.cued(monitor_cfg.cue), probes_cfg.batch_size)}
        for r in rows:
            r["score_cued"] = cued.get(r["item_id"], float("nan"))
        counts["cue_items"] = len(cued)
    families = {d.name: d.family for d in suite.dimensions.values()}
    rows = [{"family": families[r["dimension"]], **r} for r in rows]
    from datasets import Dataset
    with atomic_dir(GenDir.at(out).probes) as tmp:
        Dataset.from_list(rows).save_to_disk(str(tmp))
    counts["items"] = len(rows)
    return rows, states, counts


def _activation_probes(model, tokenizer, suite: Suite, probes_cfg, monitor_cfg, out: Path, reference: Path | None,
                       rows: list[dict], states: dict) -> dict:
    """Fit the directions (at the reference, then the steering check) or project on the
    reference's frozen ones; writes monitor/activations.json. Returns counts."""
    mon = GenDir.at(out).monitor
    counts: dict = {}
    results, directions = {}, {}
    ref_dirs = act.load_directions(GenDir.at(reference).directions) if reference is not None else None
    dim_of = np.array(states["dimension"])
    ids = np.array(states["item_id"])
    for d in dict.fromkeys(states["dimension"]):
        sel = dim_of == d
        if sel.sum() < MIN_DIRECTION_PAIRS or (ref_dirs is not None and d not in ref_dirs):
            continue
        pos, neg = states["pos"][sel], states["neg"][sel]
        frozen = ref_dirs[d] if ref_dirs is not None else act.fit_direction(pos, neg, seed=0)
        if ref_dirs is None:
            directions[d] = frozen
        results[d] = {"layer": int(frozen["layer"]), "auroc_heldout_ref": float(frozen["auroc_heldout"]),
                      "heldout_pairs": frozen.get("heldout_pairs"), "causal": frozen.get("causal"),
                      **act.measure(frozen, pos, neg, [str(i) for i in ids[sel]])}
    if ref_dirs is None:
        act.save_directions(mon / "directions", directions)
        write_json(mon / "architecture.json", _architecture(model))
    write_json(mon / "activations.json", results)
    counts["activation_dimensions"] = len(results)
    if ref_dirs is None and monitor_cfg.steer and directions:
        counts.update(mark_causal(model, tokenizer, suite, monitor_cfg, probes_cfg.batch_size, out,
                                  {r["item_id"]: r["score"] for r in rows if r["kind"] == "contrast"}))
    return counts


def _monitor_samples(model, tokenizer, prompts: list[str], monitor_cfg, mon: Path, seed: int,
                     batch_size: int) -> tuple[list[str], list | None]:
    """Free-form replies to the held-out monitor prompts (monitor/samples.jsonl), with the
    sampling pass's token entropies."""
    sampler = HFSampler(model, tokenizer, batch_size=batch_size)
    params = SamplingParams(max_new_tokens=monitor_cfg.embedding_max_new_tokens, temperature=0.7,
                            top_p=0.95, repetition_penalty=1.1, seed=seed)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    samples, entropies = sampler.chat(convs, params, desc="monitor samples", entropy=True)
    write_jsonl(mon / "samples.jsonl", [{"prompt": p, "response": s, "seed": seed}
                                        for p, s in zip(prompts, samples)])
    return samples, entropies


def _embedding_drift(samples: list[str], prompts: list[str], monitor_cfg, mon: Path, reference: Path | None,
                     seed: int) -> np.ndarray:
    """Embed the samples (monitor/embeddings.npy); against a reference, the paired MMD test on
    replies to the same prompts (monitor/embedding.json). Returns the embeddings."""
    enc = embedding.Encoder()
    emb = enc.encode(samples)
    np.save(mon / "embeddings.npy", emb)
    if reference is None:
        write_json(mon / "embedding.json", {"encoder": enc.describe(), "bandwidth": embedding.median_bandwidth(emb),
                                            "n": len(emb), "prompts": prompts})
        return emb
    ref_meta = read_json(GenDir.at(reference).monitor / "embedding.json")
    if ref_meta.get("prompts") != prompts:
        raise UserError(f"{reference / 'monitor' / 'embedding.json'}: the reference sampled other prompts; "
                        "embedding drift pairs replies to the same prompts (keep monitor.embedding_prompts "
                        "and the probe suite as they were at the reference)")
    ref_emb = np.load(GenDir.at(reference).monitor / "embeddings.npy")
    test = embedding.paired_mmd_test(ref_emb, emb, ref_meta["bandwidth"], n_perm=monitor_cfg.permutations,
                                     seed=seed)
    write_json(mon / "embedding.json", {"encoder": enc.describe(), "bandwidth": ref_meta["bandwidth"],
                                        "n": len(emb), "prompts": prompts, **test})
    return emb


def _collapse_metrics(model, tokenizer, prompts: list[str], samples: list[str], entropies: list | None,
                      emb: np.ndarray | None, monitor_cfg, batch_size: int) -> dict:
    """Distinct-n, compression and dispersion of the samples, their token entropy and the held-out
    perplexity."""
    metrics = collapse.collapse_metrics(samples, emb)
    if entropies is not None and sum(n for _, n in entropies):
        # read off the sampling pass (the same distributions a scoring pass gives, to float error;
        # tests/test_monitor.py): a second pass over prompts and samples is avoided
        metrics["mean_token_entropy"] = sum(h for h, _ in entropies) / sum(n for _, n in entropies)
    else:  # some batch was decoded by generate, which keeps no logits: score the samples instead
        metrics["mean_token_entropy"] = collapse.mean_token_entropy(
            model, tokenizer, list(zip(prompts, samples)), batch_size)
    metrics["perplexity_heldout"] = collapse.perplexity(
        model, tokenizer, collapse.heldout_texts()[:monitor_cfg.heldout_paragraphs], batch_size)
    return metrics


def mark_causal(model, tokenizer, suite: Suite, monitor_cfg, batch_size: int, folder: Path,
                base_scores: dict[str, float] | None = None) -> dict:
    """The one-off steering check of a reference's frozen directions (probes.steering): each is
    marked causal or not_causal in `monitor/directions` and `monitor/activations.json`, and the
    curves go to `monitor/steering.json`. `model` must be the reference itself. The unsteered
    scores are the reference's own probe scores (read from `folder/probes` when not given)."""
    mon = GenDir.at(folder).monitor
    t = time.perf_counter()
    directions = act.load_directions(mon / "directions")
    if base_scores is None:
        from datasets import load_from_disk
        base_scores = {r["item_id"]: r["score"] for r in load_from_disk(str(GenDir.at(folder).probes))
                       if r["kind"] == "contrast"}
    with packed_linears(model, PROBE_ROWS):  # inside the probe stage's own packing this packs nothing again
        curves = steering_check(model, tokenizer, suite, directions, list(monitor_cfg.steer_alphas), base_scores,
                                monitor_cfg.min_effect, batch_size)
    results = read_json(mon / "activations.json")
    for d, c in curves.items():
        directions[d].update(causal=c["causal"], steer_slope=c["slope"], steer_ci=c["ci"])
        if d in results:
            results[d]["causal"] = c["causal"]
    act.save_directions(mon / "directions", directions)
    write_json(mon / "activations.json", results)
    write_json(mon / "steering.json", curves)
    return {"directions_causal": sum(c["causal"] for c in curves.values()),
            "steering_s": round(time.perf_counter() - t, 3)}
