"""Drift reports after each generation, written from artifacts on disk only.

`gen-k/drift/report.json` and `report.md`: generation k against generation 0 (cumulative)
and against generation k-1 (step), alerts first, then every dimension's trajectory so far.
"""
from __future__ import annotations

from pathlib import Path

from .drift import LEVELS, compare, load_probe_table, trend
from .records import gen_dir, write_json, write_text


def _fmt(x, nd=3):
    return "–" if x is None else f"{x:+.{nd}f}" if isinstance(x, float) and x < 0 else f"{x:.{nd}f}" \
        if isinstance(x, float) else str(x)


def generation_report(run_dir: Path, k: int, alpha: float, min_effect: float) -> dict:
    run_dir = Path(run_dir)
    tables = {j: load_probe_table(gen_dir(run_dir, j) / "probes") for j in range(k + 1)}
    scores = {j: t["scores"] for j, t in tables.items()}
    families = tables[0]["families"]
    name = f"gen-{k:03d}"
    cumulative = compare(scores[0], scores[k], alpha, min_effect) if k > 0 else {}
    step = compare(scores[k - 1], scores[k], alpha, min_effect) if k > 0 else {}
    dims = {}
    for d in scores[0]:
        traj = [sum(scores[j][d].values()) / len(scores[j][d]) for j in range(k + 1) if d in scores[j]]
        dims[d] = {"family": families.get(d, ""), "trajectory": traj, "trend": trend(traj),
                   name: {"mean": traj[-1], "vs_gen0": cumulative.get(d), "vs_prev": step.get(d)}}
    alerts = []
    for kind, res in (("cumulative", cumulative), ("step", step)):
        for d, r in res.items():
            if r["level"] != "ok":
                alerts.append({"candidate": name, "dimension": d, "level": r["level"], "comparison": kind,
                               "delta": r["delta"], "p_holm": r["p_holm"]})
    alerts.sort(key=lambda a: (-LEVELS.index(a["level"]), a["comparison"], -abs(a["delta"])))
    report = {"run": str(run_dir), "generation": k, "candidate": name, "reference": "gen-000",
              "settings": {"alpha": alpha, "min_effect": min_effect, "test": "wilcoxon signed-rank, Holm"},
              "alerts": alerts,
              "answer_bias": {f"gen-{j:03d}": t["answer_bias"] for j, t in tables.items()
                              if t["answer_bias"] is not None},
              "dimensions": dims}
    out = gen_dir(run_dir, k) / "drift"
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))
    return report


def render_markdown(rep: dict) -> str:
    k, name = rep["generation"], rep["candidate"]
    lines = [f"# Drift report: {name}", "", f"Run: `{rep['run']}`  ", f"Reference: gen-000 (frozen). "
             f"Alert = Holm-corrected p < {rep['settings']['alpha']} and |shift| >= "
             f"{rep['settings']['min_effect']} in P(aligned).", ""]
    n_alert = sum(a["level"] == "alert" for a in rep["alerts"])
    n_watch = sum(a["level"] == "watch" for a in rep["alerts"])
    lines += ["## Headline", ""]
    if k == 0:
        lines.append("Generation 0 is the reference; nothing to compare yet.")
    elif not rep["alerts"]:
        lines.append("No alerts: no dimension moved detectably against gen-000 or the previous generation.")
    else:
        lines.append(f"**{n_alert} alert(s), {n_watch} watch(es).**")
        lines.append("")
        for a in rep["alerts"]:
            lines.append(f"- **{a['level'].upper()}** `{a['dimension']}` ({a['comparison']}): shift "
                         f"{a['delta']:+.3f}, p_holm = {a['p_holm']:.3g}")
    lines += ["", "## Dimensions", "",
              "| dimension | family | trajectory (gen-000 → now) | Δ vs gen-000 | p_holm | level | Δ vs prev | level |",
              "|---|---|---|---|---|---|---|---|"]
    for d, v in rep["dimensions"].items():
        cur = v[name]
        c, s = cur["vs_gen0"] or {}, cur["vs_prev"] or {}
        traj = " → ".join(f"{x:.3f}" for x in v["trajectory"])
        lines.append(f"| {d} | {v['family']} | {traj} | {_fmt(c.get('delta'))} | {_fmt(c.get('p_holm'))} | "
                     f"{c.get('level', '–')} | {_fmt(s.get('delta'))} | {s.get('level', '–')} |")
    if rep.get("answer_bias"):
        lines += ["", "## Answer bias", "", "Mean P(\"Yes\" or \"(A)\") over answer-option items, regardless of "
                  "polarity: a shift here is answer bias, not values.", ""]
        for g, b in rep["answer_bias"].items():
            lines.append(f"- {g}: {b:.3f}")
    return "\n".join(lines) + "\n"
