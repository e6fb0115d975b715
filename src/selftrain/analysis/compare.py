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
import json
import math
import re
import shlex
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from selftrain import UserError
from selftrain.analysis.stats import load_probe_table, mean_ci, option_informativeness, options_informative
from selftrain.run.layout import MANIFEST, GenDir, gen_index, gen_name, is_gen_name
from selftrain.run.records import config_diff, flatten, now, read_json, read_jsonl, write_json, write_text
from selftrain.analysis.compare_render import render_html, render_markdown
from selftrain.analysis.permutation import (EXACT_LIMIT, MAX_SEEDS, POWER, analyse, design_power, diff_ci, seed_sd,
                                            seeds_needed)

FINISHED = ("done", "gated")
# what an arm and a seed are, and where a run's metrics were also sent (never what it computed)
ALWAYS_ALLOWED = ("constitution", "seed", "run_name", "report_to")
FEWSHOT_ALLOW = "fewshot_prompts"  # the --allow name for arms whose few-shot prompts differ
ARM_ORDER = ("values", "rules", "general", "control")  # known arms first; others alphabetically
ITEMS = ("informative", "all", "contrast", "options")
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
    differing = sorted(sum(config_diff([r["manifest"]["config"] for r in runs]), []))
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


def write_comparison(comp: dict, out: Path) -> None:
    out = Path(out)
    write_json(out / "comparison.json", comp)
    write_text(out / "comparison.md", render_markdown(comp))
    write_text(out / "comparison.html", render_html(comp))
