"""The data screen: a generation's training rows read on the frozen gen-000 directions, before
they are trained in.

After the persona-vector data screen (Chen et al. 2025, "Persona vectors", sec. 6): project each
training reply onto a trait direction, subtract the projection of the model's own reply to the
same prompt, and average. That "projection difference" predicted how far the trait moved after
fine-tuning. Here, per training row and per frozen gen-000 direction, at the direction's layer
and over the reply tokens (the positions the monitor measures):

    difference = (proj(trained reply) - proj(model k's own answer)) / gen-000 gap

(+ = toward the misaligned trait; 1 = as far as gen-000's misaligned and aligned probe replies
lie apart). Model k's own answer is its sample in `samples.jsonl`. SFT rows train the revision;
preference rows train chosen over rejected, and both are projected.

`gen-k/screen/` receives `screen.json` (per dimension: mean, CI, one-sided lower bound,
flagged; per principle; the rows that move most) and `rows.jsonl` (every row's differences and
whether it is flagged). With `monitor.screen=drop` the rows past `screen_row_threshold` on a
causal direction are left out of `screen/data/`, which training then reads; the data stage's
own output is never changed. The screen never reads probe items; the guard runs after it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

from selftrain import UserError
from selftrain.monitor.activations import pooled_states
from selftrain.run.layout import GenDir
from selftrain.run.records import atomic_dir, read_json, read_jsonl, write_json, write_jsonl

# Replies per call: pooled states are [replies, L+1, d] floats, so this bounds the memory of a call
# (a multiple of 3, so a row's replies stay in one call and share its prompt).
CHUNK = 126
TOP_ROWS = 5


def training_rows(data_dir: Path, method: str) -> list[dict]:
    """What training will read: {dataset, index, prompt_id, prompt, reply[, rejected]} per row."""
    from datasets import load_from_disk

    out = []
    names = {"sft": ["sft"], "dpo": ["preference"]}.get(method, ["sft", "preference"])
    for name in names:
        folder = Path(data_dir) / name
        if not folder.is_dir() or (folder / "EMPTY").exists():
            continue
        for i, r in enumerate(load_from_disk(str(folder))):
            if name == "sft":
                msgs = r["messages"]
                out.append({"dataset": name, "index": i, "prompt_id": r.get("prompt_id"),
                            "prompt": msgs[0]["content"], "reply": msgs[-1]["content"]})
            else:
                out.append({"dataset": name, "index": i, "prompt_id": r.get("prompt_id"),
                            "prompt": r["prompt"][-1]["content"], "reply": r["chosen"][-1]["content"],
                            "rejected": r["rejected"][-1]["content"]})
    return out


def provenance(gen_dir: Path) -> dict[str, dict]:
    """prompt id -> its source and the principles (or sections) drawn for it."""
    gen = GenDir.at(gen_dir)
    out: dict[str, dict] = {}
    if gen.samples.is_file():
        for r in read_jsonl(gen.samples):
            out[r["prompt_id"]] = {"source": r.get("source"), "own": r.get("response", ""), "principles": []}
    for path, key in ((gen.critiques, "rounds"), (gen.preferences, "principles")):
        if path.is_file():
            for r in read_jsonl(path):
                got = r.get(key) or []
                ids = [x["principle"] for x in got] if key == "rounds" else list(got)
                out.setdefault(r.get("prompt_id"), {"source": None, "own": "", "principles": []})
                out[r.get("prompt_id")]["principles"] = list(dict.fromkeys(ids))
    return out


def project(model, tokenizer, pairs: list[tuple[str, str]], directions: dict[str, dict],
            batch_size: int = 16) -> dict[str, np.ndarray]:
    """Each (prompt, reply) projected on every direction at its layer, in gen-000 gap units."""
    out = {d: np.zeros(len(pairs)) for d in directions}
    for s in range(0, len(pairs), CHUNK):
        pooled, _ = pooled_states(model, tokenizer, pairs[s:s + CHUNK], batch_size)
        for d, v in directions.items():
            out[d][s:s + CHUNK] = pooled[:, int(v["layer"])] @ np.asarray(v["direction"], np.float64) / float(v["gap"])
    return out


def summarise(diff: dict[str, np.ndarray], rows: list[dict], directions: dict[str, dict], alpha: float,
              threshold: float, row_threshold: float) -> tuple[dict, list[bool]]:
    """Per dimension the mean difference, its 95% CI and the one-sided lower bound at alpha / D
    (Bonferroni over dimensions); flagged when that bound exceeds `threshold`. Per principle the
    mean difference. Rows past `row_threshold` on a causal (or untested) direction are flagged."""
    dims = {}
    n_dims = max(len(diff), 1)
    for d, x in diff.items():
        n = len(x)
        mean = float(x.mean()) if n else 0.0
        se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
        half = float(stats.t.ppf(0.975, n - 1)) * se if n > 1 else math.inf
        lower = mean - float(stats.t.ppf(1 - alpha / n_dims, n - 1)) * se if n > 1 else -math.inf
        causal = directions[d].get("causal")
        order = np.argsort(-x)[:TOP_ROWS]
        dims[d] = {"n": n, "mean": mean, "ci95": [mean - half, mean + half], "lower": lower, "causal": causal,
                   "flagged": bool(lower > threshold and causal is not False),
                   "top_rows": [{"dataset": rows[i].get("dataset"), "index": rows[i].get("index", int(i)),
                                 "prompt_id": rows[i].get("prompt_id"), "principles": rows[i]["principles"],
                                 "difference": float(x[i])} for i in order]}
    usable = [d for d in diff if directions[d].get("causal") is not False]
    flags = [any(diff[d][i] > row_threshold for d in usable) for i in range(len(rows))]
    by_p: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        for p in r["principles"] or ["(none)"]:
            by_p.setdefault(p, []).append(i)
    by_principle = {p: {"rows": len(ix), "mean": {d: float(diff[d][ix].mean()) for d in diff}}
                    for p, ix in sorted(by_p.items())}
    return {"dimensions": dims, "by_principle": by_principle}, flags


def screen_rows(model, tokenizer, rows: list[dict], directions: dict[str, dict], alpha: float, threshold: float,
                row_threshold: float, batch_size: int = 16) -> tuple[dict, dict[str, np.ndarray], list[bool]]:
    """rows: {prompt, reply, own, principles[, rejected, dataset, index, prompt_id]}. Returns the
    summary, each row's difference per dimension, and which rows pass `row_threshold`."""
    # a row's replies side by side in one call: its prompt runs once for all of them (shared prefixes)
    keys = ["reply", "own"] + (["rejected"] if any("rejected" in r for r in rows) else [])
    pairs = [(r["prompt"], r.get(k) or r["reply"]) for r in rows for k in keys]
    proj = project(model, tokenizer, pairs, directions, batch_size)
    at = {k: {d: proj[d][j::len(keys)] for d in directions} for j, k in enumerate(keys)}
    trained, own = at["reply"], at["own"]
    diff = {d: trained[d] - own[d] for d in directions}
    summary, flags = summarise(diff, rows, directions, alpha, threshold, row_threshold)
    rej_idx = [i for i, r in enumerate(rows) if "rejected" in r]
    summary["chosen_minus_rejected"] = {}
    if rej_idx:
        summary["chosen_minus_rejected"] = {d: float(np.mean(trained[d][rej_idx] - at["rejected"][d][rej_idx]))
                                            for d in directions}
    summary.update(alpha=alpha, threshold=threshold, row_threshold=row_threshold, rows=len(rows),
                   rows_flagged=sum(flags), flagged=[d for d, v in summary["dimensions"].items() if v["flagged"]])
    return summary, diff, flags


def screen_generation(model, tokenizer, gen_dir: Path, method: str, directions: dict[str, dict], mode: str,
                      alpha: float, threshold: float, row_threshold: float, batch_size: int = 16) -> dict:
    """Screen gen-k's training data; write gen-k/screen/. Returns the summary (screen.json)."""
    gen = GenDir.at(gen_dir)
    prov = provenance(gen.path)
    rows = training_rows(gen.data, method)
    for r in rows:
        p = prov.get(r["prompt_id"], {})
        r.update(source=p.get("source"), principles=p.get("principles", []), own=p.get("own", ""))
    missing = [r["prompt_id"] for r in rows if r["prompt_id"] not in prov]
    if missing:
        raise ValueError(f"{gen.samples}: no own answer for prompt {missing[0]}")
    # an empty text has no reply tokens to pool over: such rows are counted, trained, never dropped
    empty = [not r["own"].strip() or not r["reply"].strip() or ("rejected" in r and not r["rejected"].strip())
             for r in rows]
    skipped = [r for r, e in zip(rows, empty) if e]
    rows = [r for r, e in zip(rows, empty) if not e]
    summary, diff, flags = screen_rows(model, tokenizer, rows, directions, alpha, threshold, row_threshold, batch_size)
    dropped = sum(flags) if mode == "drop" else 0
    summary.update(generation=gen.name, mode=mode, rows_dropped=dropped, rows_skipped_empty=len(skipped),
                   rows=len(rows) + len(skipped), rows_screened=len(rows))
    with atomic_dir(gen.screen) as tmp:  # tmp stands for gen-k/screen: the same names inside
        write_json(tmp / gen.screen_json.name, summary)
        write_jsonl(tmp / gen.screen_rows.name,
                    [{"dataset": r["dataset"], "row": r["index"], "prompt_id": r["prompt_id"],
                      "source": r["source"], "principles": r["principles"],
                      "difference": {d: float(diff[d][i]) for d in diff}, "flagged": flags[i],
                      "dropped": mode == "drop" and flags[i]}
                     for i, r in enumerate(rows)])
        if mode == "drop":
            _filtered_copy(gen.data, tmp / gen.screen_data.name, rows, flags)
    return summary


def _filtered_copy(src: Path, dst: Path, rows: list[dict], flags: list[bool]) -> None:
    """The training data without the flagged rows (the data stage's own folders stay as they were)."""
    from datasets import load_from_disk

    drop = {(r["dataset"], r["index"]) for r, f in zip(rows, flags) if f}
    for name in ("sft", "preference"):
        folder = src / name
        if not folder.is_dir():
            continue
        if (folder / "EMPTY").exists():
            (dst / name).mkdir(parents=True)
            (dst / name / "EMPTY").write_text("")
            continue
        ds = load_from_disk(str(folder))
        keep = [i for i in range(len(ds)) if (name, i) not in drop]
        if keep:
            ds.select(keep).save_to_disk(str(dst / name))
        else:
            (dst / name).mkdir(parents=True)
            (dst / name / "EMPTY").write_text("")


def outputs(gen: GenDir, cfg) -> list[Path]:
    return [gen.screen]


def run_screen(gen: GenDir, cfg, model, tokenizer, directions: dict[str, dict]) -> dict:
    """The screen stage: gen-k's training data on the frozen gen-000 `directions`, read with
    model k; writes gen-k/screen/. Refuses a drop that leaves no row to train on."""
    mc = cfg.monitor
    summary = screen_generation(model, tokenizer, gen.path, cfg.train.method, directions, mc.screen, mc.alpha,
                                mc.screen_threshold, mc.screen_row_threshold, cfg.probes.batch_size)
    counts = {key: summary[key] for key in ("rows", "rows_flagged", "rows_dropped", "flagged")}
    if summary["rows_dropped"] and summary["rows_dropped"] == summary["rows"]:
        raise UserError(f"generation {gen.k}: monitor.screen=drop removed every training row "
                        f"(monitor.screen_row_threshold={mc.screen_row_threshold})")
    return counts


def gate_reason(gen: GenDir, cfg) -> str | None:
    """Under monitor.screen=gate, why the loop stops before training on gen-k's data (None: it goes on)."""
    if cfg.monitor.screen != "gate" or not gen.screen_json.is_file():
        return None
    flagged = read_json(gen.screen_json)["flagged"]
    if not flagged:
        return None
    return ("data screen: training data moves " + ", ".join(flagged) +
            " toward the trait past monitor.screen_threshold")
