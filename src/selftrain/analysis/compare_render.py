"""The pages of an arm comparison: comparison.md (every table), comparison.html (the verdict,
trajectory and difference charts, then the Markdown as details) and the text `--plan` prints.
Reads only the dict compare.compare_runs / compare.plan return.
"""
from __future__ import annotations

import html
import math

from selftrain.analysis import plots
from selftrain.analysis.drift_report import collapse_grid, collapse_panels
from selftrain.analysis.permutation import MAX_SEEDS
from selftrain.analysis.render import fmt, md_table, page
from selftrain.run.layout import gen_name
from selftrain.run.layout import STAGES


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


# ---------------------------------------------------------------- markdown

def _ci(e) -> str:
    if not e:
        return "–"
    ci = e.get("ci95")
    return f"{e['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def _rates(x: dict) -> list[str]:
    """An arm's revision rate and its refusal rates (revised and kept; initial), as table cells."""
    return [fmt(x["revision_rate"]), fmt(x["refusal_rate_revised"]), fmt(x["refusal_rate_initial"])]


def _diff_row(d: str, r: dict) -> str:
    ci = f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]" if r.get("ci95") else "–"
    runs = (f"{' '.join(f'{x:.3f}' for x in r['per_run_a'])} / {' '.join(f'{x:.3f}' for x in r['per_run_b'])}"
            if "per_run_a" in r else "")
    return (f"| {d} | {fmt(r.get('mean_a'))} | {fmt(r.get('mean_b'))} | {r['diff']:+.3f} | {ci} | {r['p']:.3g} | "
            f"{r['p_holm']:.3g} | {_pct(r.get('power'))} | {runs} |")


def render_markdown(c: dict) -> str:
    L = []
    for section in (_md_verdict_design, _md_instruments_fairness, _md_results, _md_drift, _md_training_compute):
        L += section(c)
    return "\n".join(L) + "\n"


def _md_verdict_design(c: dict) -> list[str]:
    """The verdict, then the design: arms, the tests and what they can reach, the seed-to-seed sd."""
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
    return L


def _md_instruments_fairness(c: dict) -> list[str]:
    """Which items were used, and what the arms differ in besides the constitution's words."""
    arms = c["arms"]
    L = []
    ins = c["instruments"]
    L += ["", "## Instruments", "", f"Items: `{ins['items']}`: {ins['rule']}.", ""]
    L += [f"- {d}: {', '.join(k)} ({ins['items_per_dimension'][d]} items)" for d, k in ins["used"].items()]
    if ins["left_out"]:
        L += ["", "Left out:"] + [f"- {d}: {w}" for d, w in ins["left_out"].items()]
    L += ["", "## Fairness", "",
          "What the arms differ in besides the constitution's words. Context tokens: the constitution text one "
          "critique round quotes (critique + revision request, mean over principles); few-shot: the transcripts "
          "before each request; both in the base model's tokens, recorded by each run. Rates from the training "
          "data below.", ""]
    fair = [(a, c["fairness"][a]) for a in arms]
    L += md_table(["arm", "context", "context tokens", "few-shot transcripts", "few-shot tokens", "few-shot prompts",
                   "revision rate", "refusal (revised, kept)", "refusal (initial)"],
                  [[a, ", ".join(f["context"]), fmt(f["context_tokens"], 0), fmt(f["fewshot_used"], 0),
                    fmt(f["fewshot_tokens"], 0), ", ".join(h[:12] for h in f["fewshot_prompts_sha256"]),
                    *_rates(f)] for a, f in fair])
    return L


def _md_results(c: dict) -> list[str]:
    """Final-generation means, each pair's differences, the novel-situation probes and the trajectories."""
    arms, G, s = c["arms"], c["final_generation"], c["settings"]
    L = []
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
    return L


def _md_drift(c: dict) -> list[str]:
    """Drift alerts, embedding effect and collapse metrics per arm."""
    arms = c["arms"]
    L = []
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
    return L


def _md_training_compute(c: dict) -> list[str]:
    """Training data, compute and the runs, per arm."""
    arms, s = c["arms"], c["settings"]
    L = []
    L += ["", "## Training data per arm", "",
          "Pooled over seeds and trained generations. Revision rate = kept / records; change = 1 − difflib "
          "word-sequence ratio between the initial answer and the final revision; refusal = one of "
          f"{len(s['refusal_phrases'])} refusal phrases (\"I can't\", \"I cannot\", \"I won't\", \"as an AI\", …) in "
          f"the first {s['refusal_window_chars']} characters.", ""]
    data = [(a, c["training_data"][a]) for a in arms]
    L += md_table(["arm", "records", "kept", "revision rate", "change", "critique words", "refusal (revised, kept)",
                   "refusal (initial)", "principle / section usage"],
                  [[a, str(t["records"]), str(t["kept"]), fmt(t["revision_rate"]), fmt(t["revision_change"]),
                    fmt(t["critique_words"], 1), *_rates(t)[1:],
                    ", ".join(f"{k} {v}" for k, v in t["principle_usage"].items())] for a, t in data])
    L += ["", "## Compute per arm", "", "Sum of stage seconds in the generation manifests.", "",
          "| arm | total s | per run s | by stage |", "|---|---|---|---|"]
    for a in arms:
        cp = c["compute"][a]
        L.append(f"| {a} | {cp['seconds_total']:.0f} | {fmt(cp['seconds_per_run'], 0)} | "
                 + ", ".join(f"{k} {v:.0f}" for k, v in cp["seconds_by_stage"].items()) + " |")
    L += ["", "## Runs", ""] + [f"- `{r['dir']}`: {r['arm']}, seed {r['seed']}, {r['status']}" for r in c["runs"]]
    return L


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
