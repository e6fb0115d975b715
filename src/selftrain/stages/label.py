"""AI-feedback labelling (the RL-CAI labelling step): soft preference labels from a labeller model.

For each prompt, model k samples `preferences.responses` responses; every pair of them is put to
a labeller as a multiple-choice question built from a constitutional principle (rules) or a
values-document section, drawn `preferences.principles` times with an RNG seeded by
(seed, prompt id, j). The labeller's reply is opened with `answer_prefix` ("The answer is (")
and the probabilities of the two option tokens are read at the next position, never parsed
from generated text. Per principle, P(first is better) = P(option of first) / (P(A) + P(B));
with `debias` the question is asked in both orders and the two answers averaged, so swapping
the responses turns p into exactly 1 - p (up to float error). With `chain_of_thought` the
labeller first samples its reasoning, then the option is read after it, and each principle's
probability is clamped to [clamp_low, clamp_high] (Bai et al. 2022 clamped to 40-60%: reasoning
first makes the choice overconfident). The soft label is the mean over principles.

Pairs are oriented so that `chosen` is the response with p >= 0.5 and `label` = P(chosen is
better) in [0.5, 1]; `margin` = |2p - 1| = 2 * label - 1 in [0, 1] (0: undecided, 1: certain).
Pairs with identical responses or a margin below `min_margin` are dropped and counted.
Writes gen-k/data/preference (prompt/chosen/rejected, conversational, as TRL's DPOTrainer
reads it; it replaces the revision pairs of the data stage) and gen-k/preferences.jsonl
(every pair with its label, votes, margin and drop reason).
"""
from __future__ import annotations

import itertools
import math
import random
import time
from collections import Counter
from pathlib import Path

from datasets import Dataset

from selftrain import UserError, models
from selftrain.constitution import Constitution, Principle
from selftrain.engines.base import Sampler, SamplingParams
from selftrain.engines.factory import close_sampler, hf_sampler, make_labeller, make_sampler
from selftrain.preferences import load_user_preferences
from selftrain.run import seeds
from selftrain.run.layout import GenDir
from selftrain.run.records import atomic_dir, read_jsonl, sha256_tree, write_jsonl
from selftrain.stages import sampling
from selftrain.text import normalised

# The multiple-choice question, after the CAI paper's comparison prompt.
QUESTION = ("Consider the following conversation between a human and an assistant:\n\n"
            "Human: {prompt}\n\n{criterion}\n\nOptions:\n({a}) {first}\n\n({b}) {second}\n\n"
            "Answer with ({a}) or ({b}).")
# Rules state what a critique looks for; the better response gives that critique less to find.
RULE_CRITERION = ("A careful reviewer was asked: \"{critique}\"\n"
                  "Which of these assistant responses gives the reviewer less to find?")
SECTION_CRITERION = ("Here is part of the guidelines the assistant tries to live by:\n\n{text}\n\n"
                     "Which of these assistant responses better reflects this part of the guidelines?")
COT_REQUEST = "\n\nFirst think step by step in two or three sentences about which response is better, then answer."


def criterion(p: Principle) -> str:
    return SECTION_CRITERION.format(text=p.text) if p.text else RULE_CRITERION.format(critique=p.critique)


def draw_principles(constitution: Constitution, seed: int, prompt_id: str, n: int) -> list[Principle]:
    """The j-th principle of a prompt's ensemble, j < n, each from an RNG seeded by (seed, prompt id, j)."""
    return [constitution.draw(random.Random(f"{seed}:label:{prompt_id}:{j}")) for j in range(n)]


def question(prompt: str, first: str, second: str, p: Principle, options) -> str:
    # the option letters in the text are the option strings themselves, stripped ("A", "B")
    a, b = (o.strip() for o in options)
    return QUESTION.format(prompt=prompt, criterion=criterion(p), first=first, second=second, a=a, b=b)


def judge(labeller: Sampler, constitution: Constitution, items: list[dict], pref,
          cot_params: SamplingParams | None = None) -> list[dict]:
    """P(first is better) for each item {"prompt", "first", "second", "principles": [ids]}.

    Returns per item {"p_first", "votes": [{"principle", "p_first", "orders", "option_mass"}]}.
    The labeller writes the reasoning (chain_of_thought) and reads the options.
    """
    options = list(pref.options)
    orders = (False, True) if pref.debias else (False,)
    asks = []  # (item index, principle index, swapped, user text)
    for i, it in enumerate(items):
        for j, pid in enumerate(it["principles"]):
            p = constitution.by_id(pid)
            for swapped in orders:
                first, second = (it["second"], it["first"]) if swapped else (it["first"], it["second"])
                asks.append((i, j, swapped, question(it["prompt"], first, second, p, options)))
    if pref.chain_of_thought:
        convs = [[{"role": "user", "content": q + COT_REQUEST}] for *_, q in asks]
        reasons = labeller.chat(convs, cot_params, desc="label reasoning")
        convs = [c + [{"role": "assistant", "content": f"{r.strip()}\n\n{pref.answer_prefix}"}]
                 for c, r in zip(convs, reasons)]
    else:
        reasons = [None] * len(asks)
        convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": pref.answer_prefix}]
                 for *_, q in asks]
    logps = labeller.option_logprobs(convs, options)
    per: dict[tuple[int, int], list] = {}
    for (i, j, swapped, _), lp, reason in zip(asks, logps, reasons):
        # normalised over the two options: P(A) / (P(A) + P(B)) = sigmoid(log P(A) - log P(B))
        p_shown_first = 1.0 / (1.0 + math.exp(lp[1] - lp[0]))
        p_first = 1.0 - p_shown_first if swapped else p_shown_first
        per.setdefault((i, j), []).append((p_first, math.exp(lp[0]) + math.exp(lp[1]), reason))
    out = []
    for i, it in enumerate(items):
        votes = []
        for j, pid in enumerate(it["principles"]):
            got = per[(i, j)]
            p = sum(g[0] for g in got) / len(got)
            if pref.chain_of_thought:
                p = min(max(p, pref.clamp_low), pref.clamp_high)
            vote = {"principle": pid, "p_first": p, "orders": [g[0] for g in got],
                    "option_mass": sum(g[1] for g in got) / len(got)}
            if pref.chain_of_thought:
                vote["reasoning"] = [g[2] for g in got]
            votes.append(vote)
        out.append({"p_first": sum(v["p_first"] for v in votes) / len(votes), "votes": votes})
    return out


def labeller_cost(pref) -> dict:
    """Labeller work per pair: option reads are one forward pass each; a chain-of-thought adds one
    generation of at most cot_max_new_tokens steps per read (so forward passes are an upper bound then)."""
    reads = pref.principles * (2 if pref.debias else 1)
    cot = reads if pref.chain_of_thought else 0
    return {"option_reads_per_pair": reads, "cot_generations_per_pair": cot,
            "forward_passes_per_pair": reads + cot * pref.cot_max_new_tokens,
            "forward_passes_exact": not pref.chain_of_thought}


def label_stage(sampler: Sampler, labeller: Sampler, constitution: Constitution, samples: list[dict], pref,
                response_params: SamplingParams, cot_params: SamplingParams, seed: int,
                gen_dir: Path | GenDir) -> dict:
    """Sample responses, label every pair, write the preference dataset and preferences.jsonl; return counts."""
    gen = gen_dir if isinstance(gen_dir, GenDir) else GenDir.at(gen_dir)
    n = pref.responses
    convs = [[{"role": "user", "content": s["prompt"]}] for s in samples for _ in range(n)]
    flat = sampler.chat(convs, response_params, desc="label responses")
    responses = [flat[i * n:(i + 1) * n] for i in range(len(samples))]
    items, counts = [], Counter()
    for s, resp in zip(samples, responses):
        principles = [p.id for p in draw_principles(constitution, seed, s["prompt_id"], pref.principles)]
        for a, b in itertools.combinations(range(n), 2):
            counts["pairs"] += 1
            if normalised(resp[a]) == normalised(resp[b]) or not resp[a].strip() or not resp[b].strip():
                counts["dropped_identical"] += 1
                continue
            items.append({"prompt_id": s["prompt_id"], "pair": [a, b], "prompt": s["prompt"],
                          "first": resp[a], "second": resp[b], "principles": principles})
    judged = judge(labeller, constitution, items, pref, cot_params) if items else []
    records, rows = [], []
    for it, j in zip(items, judged):
        p = j["p_first"]
        first_chosen = p >= 0.5
        label = p if first_chosen else 1.0 - p
        margin = abs(2 * p - 1)
        user = [{"role": "user", "content": it["prompt"]}]
        chosen, rejected = (it["first"], it["second"]) if first_chosen else (it["second"], it["first"])
        rec = {"prompt_id": it["prompt_id"], "pair": it["pair"], "prompt": user,
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}],
               "label": label, "p_first": p, "first_is_chosen": first_chosen, "margin": margin,
               "votes": j["votes"], "kept": margin >= pref.min_margin}
        records.append(rec)
        if rec["kept"]:
            rows.append({k: rec[k] for k in ("prompt_id", "prompt", "chosen", "rejected", "label", "margin")})
        else:
            counts["dropped_margin"] += 1
    write_jsonl(gen.preferences, records)
    with atomic_dir(gen.preference) as tmp:
        Dataset.from_list(rows).save_to_disk(str(tmp)) if rows else (tmp / "EMPTY").write_text("")
    labels = [r["label"] for r in records if r["kept"]]
    usage = Counter(v["principle"] for r in records for v in r["votes"])
    return {"prompts": len(samples), "responses_per_prompt": n, "pairs": counts["pairs"], "kept": len(rows),
            "dropped_identical": counts["dropped_identical"], "dropped_margin": counts["dropped_margin"],
            "min_margin": pref.min_margin, "mean_label": sum(labels) / len(labels) if labels else None,
            "mean_option_mass": (sum(v["option_mass"] for r in records for v in r["votes"])
                                 / max(1, sum(len(r["votes"]) for r in records))),
            "debias": bool(pref.debias), "chain_of_thought": bool(pref.chain_of_thought),
            "clamp": [pref.clamp_low, pref.clamp_high] if pref.chain_of_thought else None,
            "principle_usage": dict(usage), "labeller_cost": labeller_cost(pref)}



def outputs(gen: GenDir, cfg) -> list[Path]:
    """data/preference; preferences.jsonl too with AI feedback (`optional_outputs`)."""
    return [gen.preference]


def optional_outputs(gen: GenDir, cfg) -> list[Path]:
    return [gen.preferences]


def run_label(gen: GenDir, cfg, constitution: Constitution, current) -> dict:
    """The label stage: AI-feedback labels for generation k's prompts (model k samples, the labeller
    compares), or with source=dataset the user's pairs copied into data/preference.
    `current` is generation k's model, loaded on first use (selftrain.run.loop.Generation:
    model(), model_path, model_sha256, release())."""
    pref, k = cfg.preferences, gen.k
    if pref.source == "dataset":
        rows, digest = load_user_preferences(pref.path)
        with atomic_dir(gen.preference) as tmp:
            Dataset.from_list(rows).save_to_disk(str(tmp))
        return {"source": "dataset", "path": pref.path, "sha256": digest, "pairs": len(rows), "kept": len(rows)}
    # the responses to compare come from the configured engine
    sampler = make_sampler(cfg.sampler, current.model, current.model_path, cfg.model)
    labeller, who = _labeller(cfg, current, gen)
    t0 = time.perf_counter()
    counts = label_stage(sampler, labeller, constitution, read_jsonl(gen.samples), pref,
                         sampling(cfg, cfg.sampler.max_new_tokens, seeds.label_response(cfg.seed, k)),
                         sampling(cfg, pref.cot_max_new_tokens, seeds.label_cot(cfg.seed, k)),
                         seed=seeds.draw(cfg.seed, k), gen_dir=gen)
    if counts["kept"] == 0:
        raise UserError(f"generation {k}: every preference pair was dropped ({counts['dropped_identical']} identical, "
                        f"{counts['dropped_margin']} below preferences.min_margin={pref.min_margin})")
    close_sampler(sampler)
    close_sampler(labeller)
    current.release()
    return {**counts, "sampler": sampler.describe(), "labeller": who,
            "seconds_labelling": round(time.perf_counter() - t0, 3)}


def _labeller(cfg, current, gen: GenDir) -> tuple[Sampler, dict]:
    """The labeller `preferences` names (a server, a model of its own, or model k itself), and
    what the manifest records of it."""
    pref = cfg.preferences
    if pref.labeller_base_url:
        labeller = make_labeller(pref, cfg.sampler, current.model_path)
        return labeller, {"source": "preferences.labeller_base_url", **labeller.describe()}
    if pref.labeller:
        path = models.resolve(pref.labeller)
        # an in-process labeller takes the hf sampler's settings, whatever sampler.backend is
        labeller = hf_sampler(cfg.sampler, models.load_model(path, cfg.model.dtype, cfg.model.trust_remote_code,
                                                             device=cfg.model.device),
                              models.load_tokenizer(path, cfg.model.trust_remote_code), pref.batch_size)
        return labeller, {"source": "preferences.labeller", "path": path,
                          "sha256": sha256_tree(Path(path)) if Path(path).exists() else None}
    labeller = hf_sampler(cfg.sampler, *current.model(), batch_size=pref.batch_size)
    return labeller, {"source": f"model k ({gen.name})", "path": current.model_path,
                      "sha256": current.model_sha256}
