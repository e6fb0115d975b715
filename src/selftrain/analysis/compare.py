"""Compare constitutions (arms) across finished run folders: `selftrain-compare DIR [DIR ...]`.

Reads only artifacts: each run's manifest.json, gen-*/manifest.json, gen-*/probes (per-item
scores), gen-*/drift/report.json, gen-*/monitor/{collapse,embedding}.json, gen-*/critiques.jsonl
and gen-*/data/sft; never a model. Runs are grouped into arms by the constitution they
trained on (manifest `constitution.name`) and into seeds by `seeds.seed`.

Fair by construction: runs must share base model, probe suite and number of generations, and
their resolved configs may differ only in `constitution.*` (plus `seed`, `run_name` and `report_to`), unless
the user names other keys with `allow`; every arm must have the same seeds, and every arm must
show the same few-shot prompts and first answers (`allow` name: `fewshot_prompts`). Anything
else is refused with one line. The fairness table shows what the arms still differ in: the
constitution text a critique round quotes and the few-shot transcripts (tokens of the base
model, recorded by each run), and the revision and refusal rates of their training data.

Statistics. The unit of evidence is the training run: what differs between two arms is which
constitution a run trained on, and runs of one arm differ from each other (seed-to-seed
variation) by far more than items within a run can show. So each run contributes one number
per dimension, the mean P(aligned) over its items at the final generation (the items every
run scored), and arm A minus arm B is the difference of the arms' mean run scores.
- p-value: a permutation test of arm labels across whole runs, two-sided: under the null
  (the constitution makes no difference) the r_A + r_B runs are exchangeable, so every split
  into r_A and r_B is as likely as the observed one. Exact over all C(r_A + r_B, r_A) splits
  when there are at most EXACT_LIMIT, else Monte Carlo with the observed split counted (a
  valid p either way). Chosen over a mixed model because it is exact at the few runs an
  experiment can afford, needs no distributional assumption, and its floor is plain: no p
  below 2 / C(2r, r) with r runs per arm. Runs of the same seed share their prompt draw;
  ignoring that pairing can only make the test conservative when it induces positive correlation.
- correction: Holm over every (pair of arms, dimension) test, so the verdict's family-wise
  error rate is at most `monitor.alpha` across all pairs and dimensions.
- design: the smallest Holm p a design can reach is m x floor (m tests). When that is not
  below alpha, no difference can be called either way: the verdict says so and names the seeds
  per arm needed. The seed-to-seed sd per dimension is the pooled within-arm sd of run scores;
  power and seeds needed use the two-sample t test at alpha / m (Holm's first step), the usual
  planning approximation of this permutation test, and respect its floor.
- a difference is a Holm p below alpha; its size is reported against `monitor.min_effect`,
  which sets the design (the effect to detect at 80% power) rather than gating the verdict: a
  gate on the estimate would cap the power at a true effect of min_effect near one half.
- instruments: by default (`items="informative"`) contrast items everywhere, and answer-option
  items only for dimensions where the monitor's rule (drift.options_informative: polarity AUROC
  at gen-000 >= monitor.min_option_auroc) calls them informative; what is left out is listed.
- 95% CIs of a difference: pooled two-sample t interval over runs (none with one run per arm).
"""
from __future__ import annotations

import difflib
import html
import json
import math
import re
import shlex
from collections import Counter
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import numpy as np
import yaml
from scipy import integrate, stats

from selftrain import UserError
from selftrain.analysis.stats import load_probe_table, mean_ci, option_informativeness, options_informative
from selftrain.run.records import MANIFEST, flatten, now, read_json, read_jsonl, write_json, write_text
from selftrain.analysis import plots
from selftrain.analysis.pages import fmt, page
from selftrain.run.layout import GenDir, gen_index, gen_name, is_gen_name
from selftrain.analysis.drift_report import collapse_grid, collapse_panels
from selftrain.run.resume import STAGES

FINISHED = ("done", "gated")
# what an arm and a seed are, and where a run's metrics were also sent (never what it computed)
ALWAYS_ALLOWED = ("constitution", "seed", "run_name", "report_to")
FEWSHOT_ALLOW = "fewshot_prompts"  # the --allow name for arms whose few-shot prompts differ
ARM_ORDER = ("values", "rules", "general", "control")  # known arms first; others alphabetically
ITEMS = ("informative", "all", "contrast", "options")
EXACT_LIMIT = 200_000  # splits enumerated exactly up to this many (r = 9 per arm); Monte Carlo beyond
POWER = 0.8  # the power a design is planned for
MAX_SEEDS = 1000  # planning gives up beyond this many seeds per arm
# A revised answer counts as a refusal when one of these phrases occurs in its first 150
# characters (apostrophes normalised, case ignored): a plain, documented detector, not a model.
REFUSAL_PHRASES = ("i can't", "i cannot", "i can not", "i won't", "i will not", "i'm not able to",
                   "i am not able to", "i'm unable to", "i am unable to", "i'm sorry, but", "i am sorry, but",
                   "i apologize, but", "as an ai", "i must decline", "i decline", "i'm not comfortable",
                   "i refuse", "cannot help with", "can't help with", "cannot assist", "can't assist",
                   "not able to help", "unable to help", "cannot provide", "can't provide")
REFUSAL_WINDOW = 150


def is_refusal(text: str) -> bool:
    head = text[:REFUSAL_WINDOW].lower().replace("\u2019", "'")
    return any(p in head for p in REFUSAL_PHRASES)


# ---------------------------------------------------------------- finding and checking runs

def find_runs(dirs: list[Path]) -> list[Path]:
    """Each DIR is a run folder (it has manifest.json) or a sweep folder (its subfolders, one or
    two levels down, that have one)."""
    runs = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"{d}: not a folder")
        if (d / MANIFEST).is_file():
            found = [d]
        else:
            found = sorted({m.parent for pat in (f"*/{MANIFEST}", f"*/*/{MANIFEST}") for m in d.glob(pat)
                            if not is_gen_name(m.parent.name)})
        if not found:
            raise UserError(f"{d}: no runs found (no {MANIFEST} in it or in its subfolders)")
        runs += [r for r in found if r not in runs]
    return runs


def _load(run: Path) -> dict:
    try:
        m = read_json(run / MANIFEST)
    except ValueError as e:
        raise UserError(f"{run / MANIFEST}: not valid JSON ({e})") from e
    missing = [k for k in ("config", "constitution", "seeds", "status") if k not in m]
    if missing:
        raise UserError(f"{run / MANIFEST}: not a selftrain run manifest (missing '{missing[0]}')")
    status = m["status"]
    if status == "running":
        raise UserError(f"{run}: run still in progress (manifest status 'running'); wait for it to finish, "
                        "or re-run its sweep if it was killed")
    if status not in FINISHED:
        raise UserError(f"{run}: run did not finish (manifest status '{status}'); re-run its sweep to "
                        "resume it, or leave it out")
    return {"dir": run, "manifest": m, "arm": m["constitution"]["name"], "seed": m["seeds"]["seed"],
            "generations": m["config"]["generations"]}


def _check_compatible(runs: list[dict]) -> None:
    for what, get in (("base model", lambda r: r["manifest"].get("base_model")),
                      ("probe suite (sha256)", lambda r: r["manifest"].get("probe_suite", {}).get("sha256")),
                      ("number of generations", lambda r: r["generations"])):
        values = {}
        for r in runs:
            values.setdefault(str(get(r)), r["dir"])
        if len(values) > 1:
            (v1, r1), (v2, r2) = list(values.items())[:2]
            raise UserError(f"incompatible runs: different {what}: {r1} has {v1}, {r2} has {v2}")
    seen = {}
    for r in runs:
        key = (r["arm"], r["seed"])
        if key in seen:
            raise UserError(f"two runs of arm '{r['arm']}' with seed {r['seed']}: {seen[key]} and {r['dir']}; "
                            "pass only one of them")
        seen[key] = r["dir"]


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in (*ALWAYS_ALLOWED, *allow))


def check_fair(runs: list[dict], allow: list[str]) -> dict:
    """Refuse runs whose configs differ outside constitution.* / seed / run_name and the keys in
    `allow`; return the allowed differences actually present (key -> sorted distinct values)."""
    flat = [flatten(r["manifest"]["config"]) for r in runs]
    keys = sorted(set().union(*flat))
    differing = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    refused = [k for k in differing if not _allowed(k, allow)]
    if refused:
        k = refused[0]
        a = next(r for r, f in zip(runs, flat) if repr(f.get(k)) != repr(flat[0].get(k)))
        more = f" (and {len(refused) - 1} more: {', '.join(refused[1:4])}{'…' if len(refused) > 4 else ''})" \
            if len(refused) > 1 else ""
        raise UserError(f"runs differ in more than the constitution: {k} is {flat[0].get(k)!r} in "
                        f"{runs[0]['dir']} but {flatten(a['manifest']['config']).get(k)!r} in {a['dir']}{more}; "
                        "to compare anyway, name it with --allow KEY")
    seeds = {r["arm"]: set() for r in runs}
    for r in runs:
        seeds[r["arm"]].add(r["seed"])
    if len({frozenset(s) for s in seeds.values()}) > 1 and "seed" not in allow:
        shown = "; ".join(f"{a}: {', '.join(map(str, sorted(s)))}" for a, s in seeds.items())
        raise UserError(f"arms have different seeds ({shown}); run the same seeds in every arm, "
                        "or name it with --allow seed")
    by_seed = {}
    for r in runs:  # same config + seed should give the same prompts; a changed prompt file does not
        h = r["manifest"].get("prompts", {}).get("sha256")
        if h and by_seed.setdefault(r["seed"], (h, r["dir"]))[0] != h and "prompts" not in allow:
            raise UserError(f"runs with seed {r['seed']} trained on different prompts: "
                            f"{by_seed[r['seed']][1]} and {r['dir']}; name it with --allow prompts")
    _check_fewshot(runs, allow)
    return {k: sorted({repr(f.get(k)) for f in flat}) for k in differing if not _allowed(k, [])}


def _check_fewshot(runs: list[dict], allow: list[str]) -> None:
    """Every arm must show the same few-shot prompts and first answers (each run records their
    hash), or the arms differ in demonstrated behaviour as well as in constitution."""
    if FEWSHOT_ALLOW in allow:
        return
    seen: dict[str, dict] = {}
    for r in runs:
        h = r["manifest"]["constitution"].get("fewshot_prompts_sha256")
        if h is not None:
            seen.setdefault(h, r)
    if len(seen) > 1:
        (h1, r1), (h2, r2) = list(seen.items())[:2]
        c1, c2 = r1["manifest"]["constitution"], r2["manifest"]["constitution"]
        raise UserError(f"arms show different few-shot prompts: arm '{r1['arm']}' ({c1.get('path')}, "
                        f"{c1.get('fewshot_used')} used) and arm '{r2['arm']}' ({c2.get('path')}, "
                        f"{c2.get('fewshot_used')} used); give every arm the same prompts and first answers, "
                        f"or name it with --allow {FEWSHOT_ALLOW}")


def load_runs(dirs: list[Path], allow: list[str] | None = None) -> tuple[list[dict], dict]:
    runs = [_load(r) for r in find_runs(dirs)]
    _check_compatible(runs)
    return runs, check_fair(runs, list(allow or []))


def _arm_key(a: str):
    return (ARM_ORDER.index(a) if a in ARM_ORDER else len(ARM_ORDER), a)


# ---------------------------------------------------------------- statistics (the run is the unit)

@lru_cache(maxsize=32)
def _all_splits(n_a: int, n_b: int) -> np.ndarray:
    n = n_a + n_b
    masks = np.zeros((math.comb(n, n_a), n), dtype=bool)
    for i, chosen in enumerate(combinations(range(n), n_a)):
        masks[i, list(chosen)] = True
    masks.setflags(write=False)
    return masks


def splits(n_a: int, n_b: int, n_perm: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Labelings of n_a + n_b runs (rows; True = arm A; the runs of arm A come first in the data):
    all C(n, n_a) when there are at most EXACT_LIMIT (exact), else the observed labeling and
    n_perm random ones (Monte Carlo)."""
    if math.comb(n_a + n_b, n_a) <= EXACT_LIMIT:
        return _all_splits(n_a, n_b), True
    drawn = np.argsort(rng.random((n_perm, n_a + n_b)), axis=1) < n_a  # n_a True per row, uniformly placed
    return np.vstack([np.arange(n_a + n_b) < n_a, drawn]), False


def p_floor(n_a: int, n_b: int, n_perm: int | None = None) -> float:
    """The smallest p the permutation test can give: with equal arms the mirror split ties with
    the observed one, so 2 / C(2r, r); Monte Carlo cannot go below 1 / (n_perm + 1)."""
    total = math.comb(n_a + n_b, n_a)
    exact = (2 if n_a == n_b else 1) / total
    return exact if total <= EXACT_LIMIT or n_perm is None else max(exact, 1 / (n_perm + 1))


def permutation_p(ya: np.ndarray, yb: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """Two-sided p of mean(A) - mean(B), per dimension, permuting arm labels across whole runs.
    ya: (..., n_a, D) run scores of arm A; yb: (..., n_b, D); leading axes are independent
    data sets (the simulation tests use them), all tested against the same splits."""
    ya, yb = np.asarray(ya, float), np.asarray(yb, float)
    n_a, n_b, D = ya.shape[-2], yb.shape[-2], ya.shape[-1]
    masks, _ = splits(n_a, n_b, n_perm, rng)
    W = masks / n_a - (~masks) / n_b  # (P, n): the difference of means under each split
    lead = ya.shape[:-2]
    y = np.concatenate([ya, yb], axis=-2).reshape(-1, n_a + n_b, D)
    obs = np.abs(y[:, :n_a].mean(1) - y[:, n_a:].mean(1))
    tol = 1e-9 * np.maximum(obs, 1e-3)  # splits that tie with the observed one in exact arithmetic count
    count = np.zeros_like(obs)
    step = max(1, int(4e6 // (len(W) * D)))  # bounded memory for many data sets at once
    for s in range(0, len(y), step):
        T = np.abs(np.matmul(W, y[s:s + step]))  # (b, P, D)
        count[s:s + step] = (T >= (obs[s:s + step] - tol[s:s + step])[:, None, :]).sum(1)
    return (count / len(W)).reshape(*lead, D)


def holm_adjust(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values along the last axis (the same numbers as drift.holm, vectorised)."""
    p = np.asarray(p, float)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, -1) * (m - np.arange(m))
    adj = np.minimum(1.0, np.maximum.accumulate(ranked, axis=-1))
    out = np.empty_like(adj)
    np.put_along_axis(out, order, adj, -1)
    return out


def power(n_a: int, n_b: int, sigma: float | None, effect: float, alpha: float) -> float | None:
    """Power of the two-sided pooled two-sample t test at level alpha to detect a true difference
    `effect` between arms of n_a and n_b runs whose run scores have sd `sigma`."""
    df = n_a + n_b - 2
    if sigma is None or df < 1:
        return None
    if sigma <= 0:
        return 1.0 if effect else alpha
    ncp = abs(effect) / (sigma * math.sqrt(1 / n_a + 1 / n_b))
    t = stats.t.ppf(1 - alpha / 2, df)
    # P(|Z + ncp| > t S) with S^2 ~ chi2(df)/df, integrated over Z. scipy's noncentral t returns
    # nan at small df with a large ncp, which made the seeds needed jump around as sd changed.
    def reject(z: float) -> float:
        return stats.norm.pdf(z) * stats.chi2.cdf(df * ((z + ncp) / t) ** 2, df)
    pw = integrate.quad(reject, -12, 12, points=[-ncp] if ncp < 12 else None, limit=200)[0]
    return float(min(1.0, max(pw, 0.0)))


def design_power(n_a: int, n_b: int, sigma: float | None, effect: float, alpha: float, m: int,
                 n_perm: int | None = None) -> float | None:
    """Power of one of m Holm-corrected tests (planned at alpha / m); 0 when the permutation
    floor keeps every Holm p at or above alpha."""
    if m * p_floor(n_a, n_b, n_perm) >= alpha:
        return 0.0
    return power(n_a, n_b, sigma, effect, alpha / m)


def seeds_needed(sigma: float | None, effect: float, alpha: float, m: int, target: float = POWER) -> int | None:
    """Seeds per arm (equal arms) for `target` power to detect `effect` with m tests at family-wise
    alpha; with sigma None (not measured) the permutation floor alone. None beyond MAX_SEEDS."""
    for r in range(2, MAX_SEEDS + 1):
        if m * p_floor(r, r) >= alpha:
            continue
        pw = power(r, r, sigma, effect, alpha / m)
        if pw is None or pw >= target:
            return r
    return None


def seed_sd(y: dict[str, np.ndarray]) -> tuple[np.ndarray | None, int]:
    """Pooled within-arm sd of run scores per dimension (y[arm]: (runs, D)), and its df."""
    df = sum(len(v) - 1 for v in y.values())
    if df < 1:
        return None, 0
    ss = sum(((v - v.mean(0)) ** 2).sum(0) for v in y.values())
    return np.sqrt(ss / df), df


def diff_ci(ya: np.ndarray, yb: np.ndarray) -> np.ndarray | None:
    """95% pooled two-sample t interval of mean(A) - mean(B) per dimension, (D, 2); None when
    neither arm has two runs (seed-to-seed variation unmeasured)."""
    sd, df = seed_sd({"a": ya, "b": yb})
    if sd is None:
        return None
    d = ya.mean(0) - yb.mean(0)
    half = stats.t.ppf(0.975, df) * sd * math.sqrt(1 / len(ya) + 1 / len(yb))
    return np.stack([d - half, d + half], axis=-1)


def analyse(y: dict[str, np.ndarray], alpha: float, n_perm: int, rng: np.random.Generator) -> dict:
    """Every pair of arms on every dimension. y[arm]: run scores (..., runs, D), leading axes
    being independent data sets. Holm runs over all pairs x dimensions of one data set.
    Returns pairs, m (tests), and per pair (..., D) arrays diff, p, p_holm, significant, with
    the pair's p floor and whether m x floor < alpha (the design can reach alpha)."""
    pairs = list(combinations(y, 2))
    out = {"pairs": pairs, "m": 0, "diff": [], "p": [], "floor": [], "reachable": []}
    if not pairs:
        return out
    for a, b in pairs:
        out["diff"].append(np.asarray(y[a]).mean(-2) - np.asarray(y[b]).mean(-2))
        out["p"].append(permutation_p(y[a], y[b], n_perm, rng))
        out["floor"].append(p_floor(np.shape(y[a])[-2], np.shape(y[b])[-2], n_perm))
    P = np.stack(out["p"], axis=-2)  # (..., pairs, D)
    m = P.shape[-2] * P.shape[-1]
    adj = holm_adjust(P.reshape(*P.shape[:-2], m)).reshape(P.shape)
    out["m"] = m
    out["reachable"] = [m * f < alpha for f in out["floor"]]
    out["p_holm"] = [adj[..., i, :] for i in range(len(pairs))]
    # a pair whose floor keeps m x floor >= alpha calls nothing, whatever Holm's later steps allow
    out["significant"] = [(adj[..., i, :] < alpha) & out["reachable"][i] for i in range(len(pairs))]
    return out


# ---------------------------------------------------------------- per-arm descriptions

def _gen_dirs(run: dict) -> list[Path]:
    gens = (GenDir(run["dir"], k) for k in range(run["generations"] + 1))
    return [g.path for g in gens if g.probes.is_dir()]


def training_data(runs: list[dict]) -> dict:
    """Pooled over an arm's runs and trained generations."""
    from datasets import load_from_disk

    records = kept = 0
    change, crit_words, refusals_final, refusals_initial = [], [], [], []
    usage: Counter = Counter()
    for r in runs:
        for g in _gen_dirs(r):
            gm = read_json(g / MANIFEST) if (g / MANIFEST).is_file() else {}
            stages = gm.get("stages", {})
            if stages.get("data", {}).get("status") != "done":
                continue
            c = stages["data"]["counts"]
            records, kept = records + c["records"], kept + c["kept"]
            usage.update(stages.get("critique", {}).get("counts", {}).get("principle_usage", {}))
            sft = GenDir.at(g).sft
            kept_ids = set(load_from_disk(str(sft))["prompt_id"]) if (sft / "dataset_info.json").is_file() else set()
            for rec in read_jsonl(GenDir.at(g).critiques):
                change.append(1 - difflib.SequenceMatcher(None, rec["response"].split(), rec["final"].split(),
                                                          autojunk=False).ratio())
                crit_words += [len(rd["critique"].split()) for rd in rec["rounds"]]
                refusals_initial.append(is_refusal(rec["response"]))
                if rec["prompt_id"] in kept_ids:
                    refusals_final.append(is_refusal(rec["final"]))
    mean = lambda x: float(np.mean(x)) if len(x) else None  # noqa: E731
    return {"records": records, "kept": kept, "revision_rate": kept / records if records else None,
            "revision_change": mean(change), "critique_words": mean(crit_words),
            "refusal_rate_revised": mean(refusals_final), "refusal_rate_initial": mean(refusals_initial),
            "principle_usage": dict(usage.most_common())}


def drift_summary(runs: list[dict], k: int) -> dict:
    """Final-generation drift alerts per run; collapse metrics and embedding effect per generation."""
    alerts, watches, dims, gated = [], [], Counter(), 0
    collapse: dict[str, dict[int, list]] = {}
    embedding: dict[int, list] = {}
    for r in runs:
        gated += r["manifest"]["status"] == "gated"
        gens = _gen_dirs(r)
        rep = GenDir.at(gens[-1]).report_json
        if rep.is_file():
            al = read_json(rep)["alerts"]
            alerts.append(sum(a["level"] == "alert" for a in al))
            watches.append(sum(a["level"] == "watch" for a in al))
            dims.update(f"{a['dimension']} ({a['instrument']})" for a in al if a["level"] == "alert")
        for g in gens:
            gk = gen_index(g.name)
            col = GenDir.at(g).monitor / "collapse.json"
            if col.is_file():
                for m, v in read_json(col).items():
                    if isinstance(v, (int, float)):
                        collapse.setdefault(m, {}).setdefault(gk, []).append(float(v))
            emb = GenDir.at(g).monitor / "embedding.json"
            if emb.is_file() and read_json(emb).get("effect") is not None:
                embedding.setdefault(gk, []).append(float(read_json(emb)["effect"]))
    mean = lambda x: float(np.mean(x)) if x else None  # noqa: E731
    return {"runs": len(runs), "gated_runs": gated, "alerts_per_run": mean(alerts),
            "watches_per_run": mean(watches), "alerted": dict(dims.most_common()),
            "collapse": {m: [mean(v.get(g, [])) for g in range(k + 1)] for m, v in sorted(collapse.items())},
            "embedding_effect": [mean(embedding.get(g, [])) for g in range(k + 1)]}


def compute(runs: list[dict]) -> dict:
    """Sum of stage seconds from the generation manifests."""
    per_run, by_stage = [], Counter()
    for r in runs:
        total = 0.0
        for g in sorted(p for p in r["dir"].glob("*") if is_gen_name(p.name)):
            if not (g / MANIFEST).is_file():
                continue
            for name, s in read_json(g / MANIFEST).get("stages", {}).items():
                total += s.get("seconds", 0)
                by_stage[name] += s.get("seconds", 0)
        per_run.append(total)
    return {"seconds_total": float(sum(per_run)), "seconds_per_run": float(np.mean(per_run)) if per_run else None,
            "seconds_by_stage": {k: round(v, 1) for k, v in by_stage.most_common()}}


# ---------------------------------------------------------------- the comparison

def select_instruments(tables0: list[dict], items: str, min_auroc: float) -> tuple[dict, dict, dict]:
    """Which item kinds count per dimension, from the runs' gen-000 probe tables (the reference:
    the same base model in every arm). Returns ({dimension: [kinds]}, {dimension: what was left
    out and why}, {dimension: mean polarity AUROC at gen-000 or None})."""
    if items not in ITEMS:
        raise UserError(f"--items {items}: must be one of {', '.join(ITEMS)}")
    dims = sorted(set().union(*(t["families"] for t in tables0)))
    per_table = [option_informativeness(t["polarity"]) for t in tables0]
    auroc = {}
    for d in dims:
        vals = [a[d] for a in per_table if d in a]
        auroc[d] = float(np.mean(vals)) if vals else None
    kinds, left = {}, {}
    for d in dims:
        has = [g for g in ("contrast", "options") if any(d in t["by_kind"][g] for t in tables0)]
        if items == "all":
            use = has
        elif items in ("contrast", "options"):
            use = [g for g in has if g == items]
        else:
            use = [g for g in has if g == "contrast" or options_informative(auroc[d], min_auroc)]
            if "options" in has and "options" not in use:
                left[d] = ("answer-option items: " + (f"polarity AUROC at gen-000 {auroc[d]:.2f} < {min_auroc}"
                           if auroc[d] is not None else "no items of both polarities, so no polarity AUROC"))
        if use:
            kinds[d] = use
        else:
            left[d] = f"no {items if items != 'informative' else 'informative'} items"
    return kinds, left, auroc


def _collect(dirs: list[Path], allow: list[str] | None, items: str) -> dict:
    """Runs, arms, per-item scores of the chosen instruments, and the run scores at the final
    generation: y[arm] = (runs, dimensions), each run's mean over the items every run scored."""
    runs, allowed = load_runs(dirs, allow)
    arms = sorted({r["arm"] for r in runs}, key=_arm_key)
    seeds = {a: sorted(r["seed"] for r in runs if r["arm"] == a) for a in arms}
    G = runs[0]["generations"]
    mon = runs[0]["manifest"]["config"].get("monitor", {})
    alpha, min_effect = mon.get("alpha", 0.05), mon.get("min_effect", 0.03)
    min_auroc = mon.get("min_option_auroc", 0.6)
    tables = {}  # (arm, seed) -> {k: probe table}
    for r in runs:
        tables[r["arm"], r["seed"]] = {gen_index(g.name): load_probe_table(GenDir.at(g).probes)
                                       for g in _gen_dirs(r)}
    tables0 = [t[0] for t in tables.values() if 0 in t]
    if not tables0:
        raise UserError(f"{runs[0]['dir']}: no gen-000/probes in these runs")
    kinds, left_out, auroc = select_instruments(tables0, items, min_auroc)
    families = {}
    for t in tables0:
        families.update(t["families"])
    # scores[arm][seed][k] = {dimension: {item_id: P(aligned)}}, the chosen kinds only
    scores: dict = {a: {} for a in arms}
    for (a, s), per_gen in tables.items():
        scores[a][s] = {k: {d: {i: v for g in kinds[d] for i, v in t["by_kind"][g].get(d, {}).items()}
                            for d in kinds if any(d in t["by_kind"][g] for g in kinds[d])}
                        for k, t in per_gen.items()}
    final = {a: [s for s in seeds[a] if G in scores[a][s]] for a in arms}
    dims = sorted(kinds, key=lambda d: (families.get(d) != "named", d))
    if not dims:
        raise UserError(f"no probe items of kind '{items}' in these runs; try --items all")
    common = {}
    for d in dims:
        ids = [set(scores[a][s][G].get(d, {})) for a in arms for s in final[a]]
        common[d] = sorted(set.intersection(*ids)) if ids else []
    for d in [d for d in dims if not common[d] and any(final.values())]:
        left_out[d] = "no item scored by every run at the final generation"
    tested = [d for d in dims if common[d]]
    if not tested and any(final.values()):
        raise UserError("no probe item was scored by every run at the final generation; compare runs "
                        "of the same probe suite and settings")
    y = {a: np.array([[np.mean([scores[a][s][G][d][i] for i in common[d]]) for d in tested] for s in final[a]])
         for a in arms if final[a]}
    return {"runs": runs, "allowed": allowed, "arms": arms, "seeds": seeds, "G": G, "alpha": alpha,
            "min_effect": min_effect, "min_auroc": min_auroc, "families": families, "dims": dims,
            "tested": tested, "kinds": kinds, "left_out": left_out, "auroc": auroc, "scores": scores,
            "final": final, "common_items": {d: len(common[d]) for d in dims}, "y": y}


def _trajectories(c: dict) -> dict:
    out: dict = {d: {} for d in c["dims"]}
    for d in c["dims"]:
        for a in c["arms"]:
            traj = []
            for k in range(c["G"] + 1):
                per_seed = [c["scores"][a][s][k][d] for s in c["seeds"][a]
                            if k in c["scores"][a][s] and d in c["scores"][a][s][k]]
                if not per_seed:
                    traj.append(None)
                    continue
                if len(per_seed) > 1:
                    e, basis = mean_ci([np.mean(list(x.values())) for x in per_seed]), "seeds"
                else:
                    e, basis = mean_ci(per_seed[0].values()), "items (one seed)"
                traj.append({"generation": k, "mean": e["mean"], "ci95": e["ci95"], "n_seeds": len(per_seed),
                             "ci_basis": basis})
            out[d][a] = traj
    return out


def _design(c: dict, res: dict, n_perm: int) -> dict:
    """Seed-to-seed sd, what this design can reach, and the seeds per arm a powered one needs."""
    alpha, eff, m = c["alpha"], c["min_effect"], res["m"]
    sd, df = seed_sd(c["y"])
    sd_of = {d: (float(sd[j]) if sd is not None else None) for j, d in enumerate(c["tested"])}
    need = {d: seeds_needed(sd_of[d], eff, alpha, m) for d in c["tested"]} if m else {}
    floor_need = seeds_needed(None, eff, alpha, m) if m else None
    finite = [n for n in need.values() if n is not None]
    pairs = []
    for (a, b), floor, ok in zip(res["pairs"], res["floor"], res["reachable"]):
        n_a, n_b = len(c["y"][a]), len(c["y"][b])
        pairs.append({"a": a, "b": b, "n_a": n_a, "n_b": n_b, "splits": math.comb(n_a + n_b, n_a),
                      "exact": math.comb(n_a + n_b, n_a) <= EXACT_LIMIT, "p_floor": floor,
                      "min_holm_p": min(1.0, m * floor), "reachable": ok,
                      "power": {d: design_power(n_a, n_b, sd_of[d], eff, alpha, m, n_perm) for d in c["tested"]}})
    return {"tests": m, "alpha": alpha, "min_effect": eff, "target_power": POWER, "seed_sd": sd_of,
            "seed_sd_df": df, "seeds_needed": need, "seeds_needed_floor": floor_need,
            "seeds_needed_all": (max(finite) if len(finite) == len(need) and finite else None)
            if sd is not None else None,
            "pairs": pairs}


def compare_runs(dirs: list[Path], allow: list[str] | None = None, items: str = "informative",
                 n_perm: int = 10000, rng_seed: int = 0) -> dict:
    c = _collect(dirs, allow, items)
    runs, arms, seeds, G, alpha, min_effect = c["runs"], c["arms"], c["seeds"], c["G"], c["alpha"], c["min_effect"]
    tested, families = c["tested"], c["families"]
    rng = np.random.default_rng(rng_seed)
    res = analyse(c["y"], alpha, n_perm, rng)
    design = _design(c, res, n_perm)
    fams = {f: [j for j, d in enumerate(tested) if families[d] == f] for f in ("named", "novel", "external")}
    fams = {f: v for f, v in fams.items() if v}
    fres = analyse({a: np.stack([v[:, j].mean(1) for j in fams.values()], axis=1) for a, v in c["y"].items()},
                   alpha, n_perm, rng) if fams else None

    differences, verdicts = [], []
    for i, (a, b) in enumerate(res["pairs"]):
        ya, yb = c["y"][a], c["y"][b]
        ci = diff_ci(ya, yb)
        dp = design["pairs"][i]
        out = {"a": a, "b": b, "generation": G, "seeds_a": c["final"][a], "seeds_b": c["final"][b],
               "dimensions": {}, "families": {}}
        for j, d in enumerate(tested):
            out["dimensions"][d] = {
                "family": families[d], "diff": float(res["diff"][i][j]), "mean_a": float(ya[:, j].mean()),
                "mean_b": float(yb[:, j].mean()), "ci95": None if ci is None else [float(x) for x in ci[j]],
                "p": float(res["p"][i][j]), "p_holm": float(res["p_holm"][i][j]),
                "significant": bool(res["significant"][i][j]), "power": dp["power"][d],
                "n_items": c["common_items"][d], "n_a": len(ya), "n_b": len(yb),
                "per_run_a": [float(x) for x in ya[:, j]], "per_run_b": [float(x) for x in yb[:, j]]}
        if fres:
            fci = diff_ci(*(np.stack([c["y"][x][:, js].mean(1) for js in fams.values()], axis=1) for x in (a, b)))
            for j, (f, js) in enumerate(fams.items()):
                out["families"][f] = {"dimensions": [tested[x] for x in js], "diff": float(fres["diff"][i][j]),
                                      "ci95": None if fci is None else [float(x) for x in fci[j]],
                                      "p": float(fres["p"][i][j]), "p_holm": float(fres["p_holm"][i][j]),
                                      "significant": bool(fres["significant"][i][j])}
        out["verdict"] = pair_verdict(out, dp, design, G)
        differences.append(out)
        verdicts.append(out["verdict"])
    for a, b in combinations(arms, 2):
        if a not in c["y"] or b not in c["y"]:  # every run of one arm stopped (gated) before the end
            verdicts.append({"a": a, "b": b, "result": "not compared", "n_seeds": 0, "significant": [],
                             "small_significant": [],
                             "text": f"{a} vs {b}: not compared: no run of one of them reached {gen_name(G)} "
                                     "(gated by the monitor); see drift per arm."})

    novel = {"dimensions": [d for d in tested if families[d] == "novel"],
             "pairs": [{"a": r["a"], "b": r["b"], "pooled": r["families"].get("novel"),
                        "dimensions": {d: v for d, v in r["dimensions"].items() if v["family"] == "novel"}}
                       for r in differences]}
    by_arm = {a: [r for r in runs if r["arm"] == a] for a in arms}
    training = {a: training_data(by_arm[a]) for a in arms}
    return {
        "title": "Constitution comparison", "created": now(), "inputs": [str(d) for d in dirs],
        "arms": arms, "seeds": seeds, "final_generation": G,
        "runs": [{"dir": str(r["dir"]), "arm": r["arm"], "seed": r["seed"], "status": r["manifest"]["status"],
                  "constitution_sha256": r["manifest"]["constitution"].get("sha256"),
                  "generations_probed": len(_gen_dirs(r))} for r in runs],
        "design": {"base_model": runs[0]["manifest"].get("base_model"),
                   "probe_suite": runs[0]["manifest"].get("probe_suite"),
                   "allowed_differences": c["allowed"], "allow": list(allow or []), **design},
        "instruments": {"items": items, "rule": _instrument_rule(items, c["min_auroc"]),
                        "used": {d: c["kinds"][d] for d in tested}, "left_out": c["left_out"],
                        "options_polarity_auroc_gen0": c["auroc"], "items_per_dimension": c["common_items"]},
        "settings": {"alpha": alpha, "min_effect": min_effect, "min_option_auroc": c["min_auroc"], "items": items,
                     "permutations": n_perm, "exact_limit": EXACT_LIMIT, "rng_seed": rng_seed,
                     "refusal_phrases": list(REFUSAL_PHRASES), "refusal_window_chars": REFUSAL_WINDOW,
                     # the monitor's thresholds, which the plots draw as bands (the same in every run)
                     **{k: runs[0]["manifest"]["config"].get("monitor", {}).get(k)
                        for k in ("collapse_rel", "embedding_effect")}},
        "families": {d: families[d] for d in c["dims"]},
        "verdict": {"headline": _headline(arms, verdicts, c, design), "pairs": verdicts},
        "trajectories": _trajectories(c), "differences": differences, "novel": novel,
        "fairness": fairness(by_arm, training),
        "drift": {a: drift_summary(by_arm[a], G) for a in arms},
        "training_data": training,
        "compute": {a: compute(by_arm[a]) for a in arms},
    }


def _instrument_rule(items: str, min_auroc: float) -> str:
    return {"informative": "contrast items on every dimension; answer-option items only where the monitor calls "
                           f"them informative (polarity AUROC of P(Yes) at gen-000 >= {min_auroc})",
            "all": "every item (contrast and answer-option), informative or not",
            "contrast": "contrast items only", "options": "answer-option items only, informative or not"}[items]


def fairness(by_arm: dict, training: dict) -> dict:
    """What the arms differ in besides the constitution's words: per arm, from the run manifests
    (tokens of the base model) and the training data."""
    out = {}
    for a, runs in by_arm.items():
        cons = [r["manifest"]["constitution"] for r in runs]
        mean = lambda k: float(np.mean([x[k] for x in cons])) if all(k in x for x in cons) else None  # noqa: E731
        out[a] = {"context": sorted({str(x.get("context", "section (not recorded)")) for x in cons}),
                  "context_tokens": mean("context_tokens"), "fewshot_used": mean("fewshot_used"),
                  "fewshot_tokens": mean("fewshot_tokens"),
                  "fewshot_prompts_sha256": sorted({x.get("fewshot_prompts_sha256") or "not recorded" for x in cons}),
                  "revision_rate": training[a]["revision_rate"],
                  "refusal_rate_revised": training[a]["refusal_rate_revised"],
                  "refusal_rate_initial": training[a]["refusal_rate_initial"]}
    return out


def _s(n: int, word: str = "seed") -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _needs(design: dict) -> str:
    eff, n_all, n_floor = design["min_effect"], design["seeds_needed_all"], design["seeds_needed_floor"]
    if design["seed_sd_df"] < 1:
        return (f"at least {n_floor} seeds per arm for the test to reach alpha at all; the seed-to-seed sd is "
                "not measured with one seed per arm, so run a pilot with 2+ seeds per arm and "
                "`selftrain-compare --plan` on it")
    if n_all is None:
        return (f"more than {MAX_SEEDS} seeds per arm on some dimension to detect {eff} at "
                f"{POWER:.0%} power (per dimension: see Design)")
    return f"{n_all} seeds per arm to detect a difference of {eff} at {POWER:.0%} power on every dimension"


def pair_verdict(res: dict, dp: dict, design: dict, k: int) -> dict:
    a, b, dims = res["a"], res["b"], res["dimensions"]
    alpha, eff, m = design["alpha"], design["min_effect"], design["tests"]
    n = min(dp["n_a"], dp["n_b"])
    sig = [dict(r, dimension=d) for d, r in dims.items() if r["significant"]]
    small = [r["dimension"] for r in sig if abs(r["diff"]) < eff]
    head = f"{a} vs {b} at {gen_name(k)} ({dp['n_a']} and {_s(dp['n_b'])})"
    if not dp["reachable"]:
        big = max(dims.items(), key=lambda kv: abs(kv[1]["diff"]))
        text = (f"{head}: inconclusive by design. With these runs the permutation test cannot give p below "
                f"{dp['p_floor']:.3g}, so after Holm over {m} tests no p can fall below {alpha} "
                f"({m} x {dp['p_floor']:.3g} = {m * dp['p_floor']:.3g}): no difference can be called either way "
                f"(largest observed: {big[0]} {big[1]['diff']:+.3f}, not testable). Needed: {_needs(design)}.")
        label = "inconclusive (design cannot reach alpha)"
    elif sig:
        parts = [f"{a} {'higher' if r['diff'] > 0 else 'lower'} on {r['dimension']} (Δ = {r['diff']:+.3f}"
                 + (f", 95% CI [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r["ci95"] else "")
                 + f", Holm p = {r['p_holm']:.3g}"
                 + (f"; smaller than min_effect {eff}" if abs(r["diff"]) < eff else "") + ")"
                 for r in sorted(sig, key=lambda r: r["p_holm"])]
        text = (f"{head}: " + "; ".join(parts) + f". Runs are the unit; Holm over {m} tests (all pairs x "
                f"dimensions), family-wise alpha {alpha}.")
        label = "difference"
    else:
        pw = [r["power"] for r in dims.values() if r["power"] is not None]
        if not pw:
            pw_txt = "power not estimable (seed-to-seed sd unmeasured)"
        elif min(pw) >= POWER:
            pw_txt = (f"the design had at least {POWER:.0%} power to detect a difference of {eff} on every "
                      "dimension, so one that large is unlikely to have been missed")
        else:
            short = sum(p < POWER for p in pw)
            pw_txt = (f"power to detect a difference of {eff} was {min(pw):.0%}-{max(pw):.0%} per dimension, "
                      f"below {POWER:.0%} on {short} of {len(pw)}: this is not evidence of no effect; "
                      f"needed: {_needs(design)}")
        text = (f"{head}: no detectable difference on any of {len(dims)} dimensions (smallest Holm p = "
                f"{min((r['p_holm'] for r in dims.values()), default=1.0):.3g}); {pw_txt}.")
        label = "no detectable difference"
    for f, r in res.get("families", {}).items():  # the named / novel items pooled
        if r["significant"]:
            text += f" Pooled {f} dimensions: Δ = {r['diff']:+.3f} (Holm p over families = {r['p_holm']:.3g})."
    return {"a": a, "b": b, "result": label, "n_seeds": n, "reachable": dp["reachable"],
            "significant": [r["dimension"] for r in sig], "small_significant": small, "text": text}


def _headline(arms: list[str], verdicts: list[dict], c: dict, design: dict) -> str:
    if len(arms) < 2:
        return f"Only one arm ({arms[0]}): nothing to compare; trajectories below."
    n = min((len(v) for v in c["final"].values()), default=0)
    per = f"{_s(n)} per arm, runs as the unit, Holm over {design['tests']} tests"
    diff = [v for v in verdicts if v["result"] == "difference"]
    stuck = [v for v in verdicts if v["result"].startswith("inconclusive")]
    compared = [v for v in verdicts if v["result"] != "not compared"]
    if diff:
        return (f"Differences in {len(diff)} of {len(verdicts)} arm pair(s) at family-wise alpha {c['alpha']} "
                f"({per}). Details per pair below.")
    if compared and len(stuck) == len(compared):
        return (f"Inconclusive by design: with {per}, no p-value can fall below alpha {c['alpha']}, so no "
                f"difference can be called either way. Needed: {_needs(design)}.")
    return (f"No detectable difference between {', '.join(arms[:-1])} and {arms[-1]} at the final generation "
            f"({per}" + (f"; {len(stuck)} pair(s) inconclusive by design" if stuck else "") + "); see the power "
            "per dimension before reading this as no effect.")


# ---------------------------------------------------------------- planning from a pilot

def plan(dirs: list[Path], allow: list[str] | None = None, items: str = "informative",
         sweep_dir: str | None = None) -> dict:
    """Seeds per arm for a powered comparison of the pilot's arms, from the pilot's seed-to-seed
    sd, and the sweep that adds them."""
    c = _collect(dirs, allow, items)
    few = {a: c["final"].get(a, []) for a in c["arms"]}
    short = [(a, s) for a, s in few.items() if len(s) < 2]
    if short:
        a, s = short[0]
        raise UserError(f"--plan needs a pilot with at least 2 seeds per arm to measure the seed-to-seed sd: "
                        f"arm '{a}' has {len(s)} at {gen_name(c['G'])} (seeds: {', '.join(map(str, s)) or 'none'}); "
                        f"run the pilot with seed=0,1")
    if len(c["arms"]) < 2:
        raise UserError(f"--plan needs a pilot with at least 2 arms; found only '{c['arms'][0]}'")
    alpha, eff = c["alpha"], c["min_effect"]
    m = math.comb(len(c["arms"]), 2) * len(c["tested"])
    sd, df = seed_sd(c["y"])
    upper = sd * math.sqrt(df / stats.chi2.ppf(1 - POWER, df))  # one-sided 80% upper confidence bound
    dims = {d: {"seed_sd": float(sd[j]), "seed_sd_upper80": float(upper[j]),
                "seeds_needed": seeds_needed(float(sd[j]), eff, alpha, m),
                "seeds_needed_upper80": seeds_needed(float(upper[j]), eff, alpha, m)}
            for j, d in enumerate(c["tested"])}
    need = [v["seeds_needed"] for v in dims.values()]
    r = max(need) if None not in need else None
    pilot = sorted(set().union(*map(set, few.values())))
    out = {"arms": c["arms"], "pilot_seeds": pilot, "seed_sd_df": df, "tests": m, "alpha": alpha,
           "min_effect": eff, "target_power": POWER, "dimensions": dims,
           "left_out": c["left_out"], "seeds_needed_floor": seeds_needed(None, eff, alpha, m),
           "seeds_needed": r, "commands": []}
    if r is None:
        return out
    new = [s for s in range(r + len(pilot)) if s not in pilot][:max(0, r - len(pilot))]
    out["new_seeds"] = new
    if new:
        where = sweep_dir or f"{Path(c['runs'][0]['dir']).parent}-more"
        ov, note = sweep_overrides(c["runs"][0]["manifest"]["config"])
        from selftrain.paths import conf_dir
        custom = [a for a in c["arms"] if not (conf_dir() / "constitution" / f"{a}.yaml").is_file()]
        if custom:  # `constitution=NAME` picks conf/constitution/NAME.yaml
            note = "; ".join(filter(None, [note, f"arm(s) {', '.join(custom)} have no conf/constitution/<arm>.yaml: "
                                                 "add one (constitution/README.md) or set constitution.* yourself"]))
        out["commands"] = [
            " ".join(["selftrain", "-m", *ov, "constitution=" + ",".join(c["arms"]),
                      "seed=" + ",".join(map(str, new)), _shell(f"hydra.sweep.dir={where}")]),
            " ".join(["selftrain-compare", *(_shell(str(d)) for d in dirs), _shell(where)])]
        out["overrides_note"] = note
    return out


def _hydra_value(v, nested: bool = False) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(_hydra_value(x, True) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(x, True)}" for k, x in v.items()) + "}"
    text = str(v)
    # a plain word stays bare unless Hydra would read it as something else (null, 1e-4, true)
    if not nested and re.fullmatch(r"[A-Za-z0-9_./:+-]+", text) and yaml.safe_load(text) == text:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _shell(arg: str) -> str:
    """A shell word as a person would type it: bare, in single quotes, or in double quotes
    around Hydra's single-quoted values."""
    if re.fullmatch(r"[A-Za-z0-9_./:,=+@%-]+", arg):
        return arg
    if "'" not in arg:
        return f"'{arg}'"
    if not re.search(r'[$`"\\!]', arg):
        return f'"{arg}"'
    return shlex.quote(arg)


def sweep_overrides(config: dict) -> tuple[list[str], str]:
    """Command-line overrides that reproduce a run's resolved config (all but constitution.*,
    seed and run_name): the shipped experiment it is closest to, plus each key that differs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from selftrain.paths import conf_dir
    from selftrain.config.schema import register

    skip = ("resume", "force_stage")
    target = {k: v for k, v in flatten(config).items() if not _allowed(k, []) and k not in skip}
    register()
    best = None
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for exp in [None, *sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))]:
            base = flatten(OmegaConf.to_container(
                compose(config_name="config", overrides=[f"experiment={exp}"] if exp else []), resolve=True))
            diff = [k for k in target if k in base and json.dumps(base[k]) != json.dumps(target[k])]
            missing = [k for k in base if k not in target and not _allowed(k, []) and k not in skip]
            if best is None or len(diff) < len(best[1]):
                best = (exp, diff, missing)
    exp, diff, missing = best
    ov = ([f"experiment={exp}"] if exp else []) + [_shell(f"{k}={_hydra_value(target[k])}") for k in diff]
    note = (f"these runs predate config keys {', '.join(missing)}: the new runs will use their defaults"
            if missing else "")
    return ov, note


def render_plan(p: dict) -> str:
    L = [f"Plan from a pilot of {', '.join(p['arms'])} (seeds {', '.join(map(str, p['pilot_seeds']))}): "
         f"{p['tests']} tests (pairs x dimensions), Holm at family-wise alpha {p['alpha']}, a difference of "
         f"{p['min_effect']} to detect at {p['target_power']:.0%} power. The permutation floor alone needs "
         f"{p['seeds_needed_floor']} seeds per arm.", "",
         f"{'dimension':28} {'seed sd':>8} {'seeds/arm':>9} {'sd 80% upper':>13} {'seeds/arm':>9}"]
    for d, v in p["dimensions"].items():
        L.append(f"{d:28} {v['seed_sd']:8.4f} {v['seeds_needed'] or '>' + str(MAX_SEEDS):>9} "
                 f"{v['seed_sd_upper80']:13.4f} {v['seeds_needed_upper80'] or '>' + str(MAX_SEEDS):>9}")
    if p["left_out"]:
        L += ["", "Left out: " + "; ".join(f"{d}: {w}" for d, w in p["left_out"].items())]
    L.append("")
    if p["seeds_needed"] is None:
        L.append(f"Some dimension needs more than {MAX_SEEDS} seeds per arm at this min_effect: no sweep to "
                 "propose; a larger effect or fewer dimensions (probes.dimensions) would change that.")
        return "\n".join(L) + "\n"
    L.append(f"Seeds per arm needed: {p['seeds_needed']} (with the pilot's sd; with the sd's 80% upper bound, "
             f"{max(v['seeds_needed_upper80'] or MAX_SEEDS for v in p['dimensions'].values())}; the pilot's "
             f"sd rests on {p['seed_sd_df']} degrees of freedom).")
    if not p["commands"]:
        L.append("The pilot already has that many seeds per arm: compare it with selftrain-compare.")
        return "\n".join(L) + "\n"
    L += ["Launch the missing seeds, then compare the pilot and the new runs together:", "",
          "  " + p["commands"][0], "  " + p["commands"][1]]
    if p.get("overrides_note"):
        L += ["", f"Note: {p['overrides_note']}."]
    L += ["", "Add hydra/launcher=joblib hydra.launcher.n_jobs=N to run jobs in parallel."]
    return "\n".join(L) + "\n"


def write_comparison(comp: dict, out: Path) -> None:
    out = Path(out)
    write_json(out / "comparison.json", comp)
    write_text(out / "comparison.md", render_markdown(comp))
    write_text(out / "comparison.html", render_html(comp))


# ---------------------------------------------------------------- markdown

def _ci(e) -> str:
    if not e:
        return "–"
    ci = e.get("ci95")
    return f"{e['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def _diff_row(d: str, r: dict) -> str:
    ci = f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r.get("ci95") else "–"
    runs = (f"{' '.join(f'{x:.3f}' for x in r['per_run_a'])} / {' '.join(f'{x:.3f}' for x in r['per_run_b'])}"
            if "per_run_a" in r else "")
    return (f"| {d} | {fmt(r.get('mean_a'))} | {fmt(r.get('mean_b'))} | {r['diff']:+.3f} | {ci} | {r['p']:.3g} | "
            f"{r['p_holm']:.3g} | {_pct(r.get('power'))} | {runs} |")


def render_markdown(c: dict) -> str:
    arms, G, s, dz = c["arms"], c["final_generation"], c["settings"], c["design"]
    L = [f"# {c['title']}", "", "## Verdict", "", f"**{c['verdict']['headline']}**", ""]
    L += [f"- {v['text']}" for v in c["verdict"]["pairs"]]
    named = [d for d, f in c["families"].items() if f == "named"]
    novel = [d for d, f in c["families"].items() if f == "novel"]
    arm_seeds = ", ".join(f"{a} (seeds {' '.join(map(str, c['seeds'][a]))})" for a in arms)
    L += ["", "## Design", "",
          f"Arms: {arm_seeds}. "
          f"Base model: `{dz['base_model']}`. Final generation: {gen_name(G)}. "
          f"Probe suite: {(dz['probe_suite'] or {}).get('name')} "
          f"(sha256 {str((dz['probe_suite'] or {}).get('sha256'))[:12]}).",
          "", "Every run's resolved config is identical except `constitution.*`, `seed`, `run_name` and `report_to`"
          + (f"; differences allowed on purpose: {', '.join(f'`{k}`' for k in dz['allowed_differences'])}"
             if dz["allowed_differences"] else "") + ".", "",
          f"Dimensions named by the rules: {', '.join(named) or '–'}.  ",
          f"Novel (neither constitution mentions them): {', '.join(novel) or '–'}.", "",
          "The unit of evidence is the training run: each run's score on a dimension is its mean P(aligned) "
          "over the items every run scored at the final generation. Arm A − arm B is the difference of the "
          "arms' mean run scores; p from permuting arm labels across whole runs (exact over every split, "
          f"Monte Carlo with {s['permutations']} splits beyond {s['exact_limit']}); Holm over all "
          f"{dz['tests']} tests (pairs × dimensions); a difference is a Holm p < {s['alpha']}. 95% CIs: "
          f"pooled t interval over runs. Power: two-sample t test at alpha / {dz['tests']} for a difference of "
          f"{s['min_effect']} (`monitor.min_effect`) with the observed seed-to-seed sd.", "",
          "| pair | runs | splits | smallest p | smallest Holm p | can reach alpha |", "|---|---|---|---|---|---|"]
    for p in dz["pairs"]:
        L.append(f"| {p['a']} − {p['b']} | {p['n_a']} + {p['n_b']} | {p['splits']} "
                 f"({'exact' if p['exact'] else 'Monte Carlo'}) | {p['p_floor']:.3g} | {p['min_holm_p']:.3g} | "
                 f"{'yes' if p['reachable'] else 'no'} |")
    L += ["", f"Seed-to-seed sd (pooled within arms, {dz['seed_sd_df']} df) and seeds per arm for "
          f"{dz['target_power']:.0%} power to detect {s['min_effect']}; the permutation floor alone needs "
          f"{dz['seeds_needed_floor'] or '–'}.", "",
          "| dimension | seed-to-seed sd | power now (worst pair) | seeds per arm needed |", "|---|---|---|---|"]
    for d, sd in dz["seed_sd"].items():
        pw = [p["power"][d] for p in dz["pairs"] if p["power"].get(d) is not None]
        L.append(f"| {d} | {fmt(sd, 4)} | {_pct(min(pw) if pw else None)} | "
                 f"{dz['seeds_needed'].get(d) or ('not measured' if sd is None else f'> {MAX_SEEDS}')} |")
    ins = c["instruments"]
    L += ["", "## Instruments", "", f"Items: `{ins['items']}`: {ins['rule']}.", ""]
    L += [f"- {d}: {', '.join(k)} ({ins['items_per_dimension'][d]} items)" for d, k in ins["used"].items()]
    if ins["left_out"]:
        L += ["", "Left out:"] + [f"- {d}: {w}" for d, w in ins["left_out"].items()]
    L += ["", "## Fairness", "",
          "What the arms differ in besides the constitution's words. Context tokens: the constitution text one "
          "critique round quotes (critique + revision request, mean over principles); few-shot: the transcripts "
          "before each request; both in the base model's tokens, recorded by each run. Rates from the training "
          "data below.", "",
          "| arm | context | context tokens | few-shot transcripts | few-shot tokens | few-shot prompts | "
          "revision rate | refusal (revised, kept) | refusal (initial) |", "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        f = c["fairness"][a]
        L.append(f"| {a} | {', '.join(f['context'])} | {fmt(f['context_tokens'], 0)} | {fmt(f['fewshot_used'], 0)} | "
                 f"{fmt(f['fewshot_tokens'], 0)} | {', '.join(h[:12] for h in f['fewshot_prompts_sha256'])} | "
                 f"{fmt(f['revision_rate'])} | {fmt(f['refusal_rate_revised'])} | {fmt(f['refusal_rate_initial'])} |")
    L += ["", "## Final generation: mean P(aligned) per arm", "",
          "95% CI across seeds (across items when an arm has one seed).", "",
          f"| dimension | family | {' | '.join(arms)} |", "|---|---|" + "---|" * len(arms)]
    for d, per in c["trajectories"].items():
        L.append(f"| {d} | {c['families'][d]} | " + " | ".join(_ci((per[a] or [None])[-1]) for a in arms) + " |")
    for r in c["differences"]:
        L += ["", f"## {r['a']} − {r['b']} at {gen_name(G)}", "",
              f"| dimension | {r['a']} | {r['b']} | Δ | 95% CI | p | p (Holm) | power for {s['min_effect']} | "
              f"run scores {r['a']} / {r['b']} |", "|---|---|---|---|---|---|---|---|---|"]
        L += [_diff_row(d, v) for d, v in r["dimensions"].items()]
        L += [_diff_row(f"**all {f}** (Holm over families)", v) for f, v in r["families"].items()]
    L += ["", "## Novel-situation probes", "",
          "Dimensions neither constitution mentions: does a difference generalise beyond what was trained?", ""]
    if not c["novel"]["dimensions"]:
        L.append("This probe suite has no novel-family dimensions.")
    for p in c["novel"]["pairs"]:
        r = p["pooled"]
        if r:
            ci = f" [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r["ci95"] else ""
            L.append(f"- {p['a']} − {p['b']}, novel dimensions pooled: Δ = {r['diff']:+.3f}{ci}, p = {r['p']:.3g} "
                     f"(Holm over families {fmt(r.get('p_holm'))}); per dimension: "
                     + ", ".join(f"{d} {v['diff']:+.3f} (Holm p {v['p_holm']:.3g})"
                                 for d, v in p["dimensions"].items()))
    L += ["", "## Trajectories (mean P(aligned) [95% CI] per generation)", "",
          f"| dimension | arm | {' | '.join(gen_name(k) for k in range(G + 1))} |",
          "|---|---|" + "---|" * (G + 1)]
    for d, per in c["trajectories"].items():
        for a in arms:
            L.append(f"| {d} | {a} | " + " | ".join(_ci(e) for e in per[a]) + " |")
    L += ["", "## Drift and collapse per arm", "",
          "Final-generation drift report (cumulative against gen-000 and step); collapse metrics and the "
          "embedding effect (× reseed null) are means over seeds per generation.", "",
          "| arm | runs | gated | alerts/run | watches/run | alerted (count over runs) | embedding effect by gen |",
          "|---|---|---|---|---|---|---|"]
    for a in arms:
        dr = c["drift"][a]
        L.append(f"| {a} | {dr['runs']} | {dr['gated_runs']} | {fmt(dr['alerts_per_run'], 2)} | "
                 f"{fmt(dr['watches_per_run'], 2)} | {', '.join(f'{k} ×{v}' for k, v in dr['alerted'].items()) or '–'} | "
                 f"{' → '.join(fmt(x, 2) for x in dr['embedding_effect'])} |")
    metrics = sorted({m for a in arms for m in c["drift"][a]["collapse"]})
    if metrics:
        L += ["", f"| collapse metric | {' | '.join(arms)} |", "|---|" + "---|" * len(arms)]
        for m in metrics:
            L.append(f"| {m} | " + " | ".join(" → ".join(fmt(x) for x in c["drift"][a]["collapse"].get(m, []))
                                             for a in arms) + " |")
    L += ["", "## Training data per arm", "",
          "Pooled over seeds and trained generations. Revision rate = kept / records; change = 1 − difflib "
          "word-sequence ratio between the initial answer and the final revision; refusal = one of "
          f"{len(s['refusal_phrases'])} refusal phrases (\"I can't\", \"I cannot\", \"I won't\", \"as an AI\", …) in "
          f"the first {s['refusal_window_chars']} characters.", "",
          "| arm | records | kept | revision rate | change | critique words | refusal (revised, kept) | "
          "refusal (initial) | principle / section usage |", "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        t = c["training_data"][a]
        L.append(f"| {a} | {t['records']} | {t['kept']} | {fmt(t['revision_rate'])} | {fmt(t['revision_change'])} | "
                 f"{fmt(t['critique_words'], 1)} | {fmt(t['refusal_rate_revised'])} | {fmt(t['refusal_rate_initial'])} | "
                 + ", ".join(f"{k} {v}" for k, v in t["principle_usage"].items()) + " |")
    L += ["", "## Compute per arm", "", "Sum of stage seconds in the generation manifests.", "",
          "| arm | total s | per run s | by stage |", "|---|---|---|---|"]
    for a in arms:
        cp = c["compute"][a]
        L.append(f"| {a} | {cp['seconds_total']:.0f} | {fmt(cp['seconds_per_run'], 0)} | "
                 + ", ".join(f"{k} {v:.0f}" for k, v in cp["seconds_by_stage"].items()) + " |")
    L += ["", "## Runs", ""] + [f"- `{r['dir']}`: {r['arm']}, seed {r['seed']}, {r['status']}" for r in c["runs"]]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- html

def render_html(c: dict) -> str:
    e, arms, G, s = html.escape, c["arms"], c["final_generation"], c["settings"]
    body = [f"<h1>{e(c['title'])}</h1><h2>Verdict</h2><p><b>{e(c['verdict']['headline'])}</b></p><ul>"]
    body += [f"<li class='{'watch' if v['result'] == 'difference' else 'ok'}'>{e(v['text'])}</li>"
             for v in c["verdict"]["pairs"]]
    body.append("</ul><h2>Per-dimension trajectories per arm (mean P(aligned), 95% CI)</h2>"
                f"<p class='note'>Every panel spans the same height of P(aligned) (at least {4 * s['min_effect']:g}), "
                "so equal slopes are equal shifts. CIs are across seeds (across items when an arm has one seed); "
                "arms are drawn side by side at each generation.</p>")
    panels = [{"title": f"{d} ({c['families'][d]})",
               "series": {a: [(x["generation"], x["mean"], *(x["ci95"] or (None, None))) for x in per[a] if x]
                          for a in arms}} for d, per in c["trajectories"].items()]
    body.append(plots.grid(panels, ylabel="P(aligned)", min_span=4 * s["min_effect"], bounds=(0.0, 1.0)))
    for r in c["differences"]:
        body.append(f"<h2>{e(r['a'])} − {e(r['b'])} at {gen_name(G)}</h2><div class='scroll'><table><tr>"
                    "<th>dimension</th><th>family</th><th>Δ</th><th>95% CI</th><th>p</th><th>p (Holm)</th></tr>")
        rows = list(r["dimensions"].items()) + [(f"all {f}", v) for f, v in r["families"].items()]
        for d, v in rows:
            fam = v.get("family", "pooled")
            cls = "watch" if v.get("significant") else ""
            ci = f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" if v.get("ci95") else "–"
            body.append(f"<tr class='{cls}'><td>{e(d)}</td><td>{e(fam)}</td><td>{v['diff']:+.3f}</td>"
                        f"<td>{ci}</td><td>{v['p']:.3g}</td>"
                        f"<td>{e(fmt(v.get('p_holm')))}</td></tr>")
        body.append("</table></div>")
    body.append(_drift_html(c))
    body.append("<h2>Details</h2><pre>" + e(render_markdown(c)) + "</pre>")
    return page(c["title"], "".join(body))


def _drift_html(c: dict) -> str:
    """Per arm: collapse metrics and embedding drift over generations (means over seeds), and
    where each arm's compute went."""
    arms, s = c["arms"], c["settings"]
    gens = [gen_name(k) for k in range(c["final_generation"] + 1)]
    out = []
    rel = s.get("collapse_rel")
    metrics = sorted({m for a in arms for m in c["drift"][a]["collapse"]})
    if metrics and rel:
        per_arm = {a: collapse_panels({g: {m: v[k] for m, v in c["drift"][a]["collapse"].items() if v[k] is not None}
                                       for k, g in enumerate(gens)}, gens) for a in arms}
        panels = []
        for m in metrics:
            mine = {a: next((p for p in per_arm[a] if p["key"] == m), None) for a in arms}
            first = next((p for p in mine.values() if p), None)
            if first is None:
                continue
            panels.append({"title": first["title"].split(":")[0], "centre": 0.0,
                           "series": {a: p["series"]["change vs gen-000"] for a, p in mine.items() if p}})
        out.append("<h2>Collapse metrics per arm</h2><p class='note'>Relative change of each metric against the "
                   f"arm's own gen-000 (mean over seeds), one scale for all panels; grey: within ±{100 * rel:g}% "
                   "(monitor.collapse_rel), where no watch is raised.</p>")
        out.append(collapse_grid(panels, rel))
    emb = {a: [(k, v, None, None) for k, v in enumerate(c["drift"][a]["embedding_effect"]) if v is not None]
           for a in arms}
    if any(emb.values()):
        thr = s.get("embedding_effect")
        out.append("<h2>Embedding drift per arm</h2><p class='note'>Biased MMD² against gen-000 over its swap-null "
                   "mean (about 1 is noise), mean over seeds" + (f"; grey: below the watch threshold {thr:g}"
                                                                   if thr else "") + ".</p>")
        out.append(plots.grid([{"title": "embedding drift (× swap-null mean)", "series": emb,
                                "band": (0.0, thr) if thr else None}], ylabel="× null", min_span=2.0,
                              bounds=(0.0, math.inf), ncols=2, band_label="below the watch threshold"))
    stages = sorted({st for a in arms for st in c["compute"][a]["seconds_by_stage"]},
                    key=lambda st: (STAGES.index(st) if st in STAGES else len(STAGES), st))
    if stages:
        runs = {a: max(c["drift"][a]["runs"], 1) for a in arms}
        out.append("<h2>Compute per arm</h2><p class='note'>Seconds per run by stage (mean over the arm's runs), "
                   "from the generation manifests.</p>")
        out.append(plots.stacked_bars(list(arms), {st: [c["compute"][a]["seconds_by_stage"].get(st, 0.0)
                                                                  / runs[a] for a in arms] for st in stages},
                                      xlabel="seconds per run"))
    return "".join(out)
