"""Build training data from critique records: SFT `messages` and preference pairs.

SFT: the user prompt and the final revision. Preference: prompt, chosen = final revision,
rejected = initial response (the open-recipe pairs). Empty, degenerate and unchanged
revisions are dropped and each drop is counted. Writes gen-k/data/sft, and gen-k/data/preference
unless a label stage runs (its labelled pairs are then the preference data).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from datasets import Dataset

from selftrain import UserError
from selftrain.run.layout import GenDir
from selftrain.run.records import atomic_dir, check_disk, read_jsonl
from selftrain.stages import labels
from selftrain.text import verdict


def build_datasets(records: list[dict], out_dir: Path, min_words: int,
                   max_top_trigram_share: float, preference: bool = True) -> dict:
    """Write out_dir/sft (and out_dir/preference, unless `preference` is false) from the critique
    records; return the counts of kept and dropped revisions."""
    counts = Counter()
    sft, pref = [], []
    for rec in records:
        v = verdict(rec["response"], rec["final"], min_words, max_top_trigram_share)
        counts[v] += 1
        if v != "kept":
            continue
        user = {"role": "user", "content": rec["prompt"]}
        sft.append({"prompt_id": rec["prompt_id"],
                    "messages": [user, {"role": "assistant", "content": rec["final"]}]})
        pref.append({"prompt_id": rec["prompt_id"], "prompt": [user],
                     "chosen": [{"role": "assistant", "content": rec["final"]}],
                     "rejected": [{"role": "assistant", "content": rec["response"]}]})
    # Arrow stores the text about as JSON does; the two datasets hold each prompt and revision
    # twice and each initial response once. 1.5x that (plus 1 MB of metadata) is the estimate.
    text = sum(2 * len(r["prompt"].encode()) + 2 * len(r["final"].encode()) + len(r["response"].encode())
               for r in records)
    check_disk(out_dir, int(1.5 * text) + (1 << 20), f"the datasets in {out_dir}")
    for name, rows in (("sft", sft), ("preference", pref))[:2 if preference else 1]:
        with atomic_dir(Path(out_dir) / name) as tmp:
            Dataset.from_list(rows).save_to_disk(str(tmp)) if rows else (tmp / "EMPTY").write_text("")
    return {"records": len(records), "kept": counts["kept"], "dropped_empty": counts["empty"],
            "dropped_degenerate": counts["degenerate"], "dropped_unchanged": counts["unchanged"]}


def outputs(gen: GenDir, cfg) -> list[Path]:
    """data/sft, and data/preference unless the label stage owns it."""
    return [gen.sft] + ([] if labels(cfg) else [gen.preference])


def run_data(gen: GenDir, cfg) -> dict:
    """The data stage: gen-k/critiques.jsonl -> gen-k/data/. Refuses a generation with no revision kept."""
    counts = build_datasets(read_jsonl(gen.critiques), gen.data, cfg.data.min_words,
                            cfg.data.max_top_trigram_share, preference=not labels(cfg))
    if counts["kept"] == 0:
        raise UserError(f"generation {gen.k}: every revision was dropped ({counts}); "
                        "raise critique.revision_max_new_tokens or check the model")
    return counts
