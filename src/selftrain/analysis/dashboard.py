"""The run dashboard, `runs/<run>/index.html`: one self-contained page per run, rebuilt from the
run folder's artifacts alone (manifests, drift reports, critiques, training data), never from a
live object, so `selftrain-dashboard RUN` rebuilds it for any run, finished or not.

What it shows: the run's status and any gate with its reason; a config summary; every value
dimension across all generations (95% CIs, alerts marked), the activation shifts, the monitor's
power per generation, collapse and embedding drift; where the time went per generation; and a
transcript browser per generation (prompt, initial answer, each critique and revision with the
principle or section drawn, and whether the row was kept for training or dropped and why),
filtered by principle, source and kept/dropped with a little inline script.

Transcripts are sampled so that a run of many generations or many prompts still gives a page
that opens in a few seconds: at most TRANSCRIPTS_PER_GEN per generation and TRANSCRIPTS_TOTAL
per page, a seeded draw (rows a data screen flagged first), each text cut at TEXT_CHARS; the page
says how many it shows of how many. Rows a screen flagged are marked when `gen-k/screen/rows.jsonl`
exists: `{"row": i, "flagged": bool, ...}` per line, where `row` is the 0-based line of
`gen-k/critiques.jsonl` (a `prompt_id` field, where present, is matched instead, as the screen
writes it). Under `monitor.screen=drop` a row the screen left out of `gen-k/screen/data/sft` shows
as dropped by the screen. Every string
from a model, a prompt file or a constitution is HTML-escaped.
"""
from __future__ import annotations

import html
import json
import random
from pathlib import Path

from selftrain.analysis import plots
from selftrain.analysis.render import fmt, page
from selftrain.run.layout import MANIFEST, GenDir, gen_dirs, gen_index, gen_name
from selftrain.run.records import read_json, write_text
from selftrain.text import verdict
from selftrain.run.layout import STAGES
from selftrain.analysis.drift_report import (collapse_grid, collapse_panels, embedding_points, stage_timings, value_grid, value_panels,
                     value_scale_note)

TRANSCRIPTS_PER_GEN = 200
TRANSCRIPTS_TOTAL = 2000
PAGE_ROWS = 20  # transcripts per page of a generation's browser
TEXT_CHARS = 3000  # longer model text is cut on the page (the file keeps all of it)


def write_dashboard(run_dir: Path) -> Path:
    """Write `run_dir/index.html` from the folder's artifacts; return its path."""
    run_dir = Path(run_dir)
    out = run_dir / "index.html"
    write_text(out, render(collect(run_dir)))
    return out


def _json(path: Path) -> dict | None:
    try:
        return read_json(path) if path.is_file() else None
    except ValueError:  # a file being written by a live run: shown as missing, the next rebuild reads it
        return None


def _gens(run_dir: Path) -> list[Path]:
    return gen_dirs(run_dir)


def collect(run_dir: Path) -> dict:
    """Everything the page shows, read from disk."""
    run_dir = Path(run_dir)
    manifest = _json(run_dir / MANIFEST) or {}
    gens = _gens(run_dir)
    reports = {g.name: _json(GenDir.at(g).report_json) for g in gens}
    reports = {n: r for n, r in reports.items() if r}
    latest = reports[max(reports)] if reports else None
    alerts = [a for r in reports.values() for a in r.get("alerts", []) + r.get("improvements", [])]
    k_last = gen_index(gens[-1].name) if gens else 0
    data_cfg = (manifest.get("config") or {}).get("data") or {}
    n_gens = sum(GenDir.at(g).critiques.is_file() for g in gens)
    per_gen = max(1, min(TRANSCRIPTS_PER_GEN, TRANSCRIPTS_TOTAL // max(n_gens, 1)))
    return {"run_dir": str(run_dir), "name": run_dir.name, "manifest": manifest,
            "gen_manifests": {g.name: _json(g / MANIFEST) or {} for g in gens},
            "reports": reports, "latest": latest, "alerts": alerts,
            "timings": stage_timings(run_dir, k_last) if gens else {},
            "transcripts": {g.name: transcripts(g, data_cfg, per_gen) for g in gens
                            if GenDir.at(g).critiques.is_file()}}


# ---------------------------------------------------------------- transcripts

def screen_rows(gen: Path) -> dict:
    """What a data screen recorded per row: {("id", prompt_id) or ("row", i): [records]} (a prompt
    can have an SFT and a preference row)."""
    path = GenDir.at(gen).screen_rows
    out: dict = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            key = ("id", str(rec["prompt_id"])) if rec.get("prompt_id") is not None else ("row", rec.get("row"))
            out.setdefault(key, []).append(rec)
    return out


def kept_ids(sft: Path) -> set[str] | None:
    """prompt ids of the rows of an SFT dataset folder; None when it has not been written."""
    if (sft / "EMPTY").is_file():
        return set()
    if not (sft / "dataset_info.json").is_file():
        return None
    from datasets import load_from_disk

    return {str(x) for x in load_from_disk(str(sft))["prompt_id"]}


def transcripts(gen: Path, data_cfg: dict, limit: int) -> dict:
    """A seeded sample of gen/critiques.jsonl (flagged rows first), each with its data verdict."""
    path = GenDir.at(gen).critiques
    screen = screen_rows(gen)
    flags = {k for k, recs in screen.items() if any(r.get("flagged") for r in recs)}
    by_id = {k[1] for k in flags if k[0] == "id"}
    flagged_rows, total = [], 0
    # One pass to count the rows; lines are parsed only when a screen names rows by prompt id.
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            if ("row", total) in flags or (by_id and str(json.loads(line).get("prompt_id")) in by_id):
                flagged_rows.append(total)
            total += 1
    first = set(flagged_rows)
    rest = [i for i in range(total) if i not in first]
    take = flagged_rows[:limit]
    take += random.Random(f"dashboard:{gen.name}").sample(rest, min(len(rest), limit - len(take)))
    wanted = set(take)
    kept = kept_ids(GenDir.at(gen).sft)
    # monitor.screen=drop: training reads the screen's filtered copy, so a row it left out was dropped
    screened = kept_ids(GenDir.at(gen).screen_data / GenDir.at(gen).sft.name)
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        i = 0
        for line in f:
            if not line.strip():
                continue
            if i in wanted:
                rows.append(_row(i, json.loads(line), kept, screened, screen, data_cfg))
            i += 1
    return {"total": total, "shown": len(rows), "flagged": len(flagged_rows),
            "screen": bool(screen), "rows": rows}


def _row(i: int, rec: dict, kept: set[str] | None, screened: set[str] | None, screen: dict,
         data_cfg: dict) -> dict:
    pid = str(rec.get("prompt_id", ""))
    initial, final = str(rec.get("response", "")), str(rec.get("final", ""))
    if kept is None:
        status, reason = "pending", "the data stage has not run"
    elif pid in kept and screened is not None and pid not in screened:
        status, reason = "dropped", "by the data screen"
    elif pid in kept:
        status, reason = "kept", "trained on"
    else:  # the data stage's own filter, with the run's settings, says why
        why = (verdict(initial, final, data_cfg["min_words"], data_cfg["max_top_trigram_share"])
               if {"min_words", "max_top_trigram_share"} <= set(data_cfg) else "kept")
        status, reason = "dropped", why if why != "kept" else "not in data/sft"
    seen = screen.get(("id", pid)) or screen.get(("row", i)) or []
    return {"row": i, "prompt_id": pid, "source": str(rec.get("source", "")), "category": str(rec.get("category", "")),
            "prompt": str(rec.get("prompt", "")), "initial": initial, "final": final,
            "rounds": [{"principle": str(r.get("principle", "")), "critique": str(r.get("critique", "")),
                        "revision": str(r.get("revision", ""))} for r in rec.get("rounds") or []],
            "status": status, "reason": reason, "flagged": any(r.get("flagged") for r in seen),
            "screen": [{k: v for k, v in r.items() if k not in ("row", "prompt_id", "source", "principles")}
                       for r in seen]}


# ---------------------------------------------------------------- rendering

def _rounded(x):
    """Floats to 4 places, for reading."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + f" … [cut at {TEXT_CHARS} characters]"


def _status_html(d: dict) -> str:
    e, m = html.escape, d["manifest"]
    status = m.get("status", "no manifest")
    cls = {"done": "ok", "gated": "alert", "failed": "alert", "interrupted": "watch", "running": "watch"}.get(status, "")
    out = [f"<h1>selftrain run: {e(d['name'])}</h1><p><code>{e(d['run_dir'])}</code></p>",
           f"<p class='{cls}' id='status'>Status: <b>{e(str(status))}</b>"]
    cfg = m.get("config") or {}
    if cfg.get("generations") is not None:
        out.append(f" · generations finished {e(str(m.get('generations_done', 0)))} of {cfg['generations'] + 1} "
                   f"({gen_name(0)} … {gen_name(cfg['generations'])})")
    out.append(f" · started {e(str(m.get('started', '–')))}" + (f" · finished {e(str(m['finished']))}"
                                                                   if m.get("finished") else "") + "</p>")
    gate = m.get("gate")
    if gate:
        out.append(f"<p class='alert'>Gate: the monitor stopped the run at {e(str(gate.get('at')))} before "
                   f"{e(str(gate.get('stopped_before')))}: {e(str(gate.get('reason')))}</p>")
    if m.get("error"):
        out.append(f"<p class='alert'>Error: {e(str(m['error']))}</p>")
    attempts = m.get("attempts") or []
    if len(attempts) > 1:
        out.append(f"<p class='note'>{len(attempts)} attempts: " + "; ".join(
            f"{e(str(a.get('mode')))} from {e(str(a.get('from') or '–'))}" for a in attempts) + "</p>")
    tr = m.get("tracker")
    if tr:
        out.append(f"<p class='note'>Tracker: {e(str(tr.get('report_to')))}, project/group "
                   f"<code>{e(str(tr.get('group')))}</code>, run <code>{e(str(tr.get('run')))}</code>"
                   + (f", logs in <code>{e(str(tr['log_dir']))}</code>" if tr.get("log_dir") else "") + "</p>")
    return "".join(out)


def _config_html(m: dict) -> str:
    e = html.escape
    cfg = m.get("config") or {}
    if not cfg:
        return ""
    con, pr, ps = m.get("constitution") or {}, m.get("prompts") or {}, m.get("probe_suite") or {}
    tr, sa, mo = cfg.get("train") or {}, cfg.get("sampler") or {}, cfg.get("monitor") or {}
    rows = [
        ("constitution", f"{con.get('name', (cfg.get('constitution') or {}).get('name'))} ({con.get('kind', '?')}, "
                         f"{len(con.get('principles') or [])} principles/sections, context {con.get('context', '–')}); "
                         f"{con.get('path', '')} · sha256 {str(con.get('sha256', ''))[:12]}"),
        ("model (gen-000)", str(m.get("base_model") or (cfg.get("model") or {}).get("name_or_path"))),
        ("seed", str((m.get("seeds") or {}).get("seed", cfg.get("seed")))),
        ("generations", f"{cfg.get('generations')} trained, {gen_name(0)} … {gen_name(cfg.get('generations', 0))} probed"),
        ("prompts", f"{pr.get('count', '–')} (" + ", ".join(f"{k} {v}" for k, v in (pr.get("by_source") or {}).items())
                    + ")"),
        ("critique", f"{(cfg.get('critique') or {}).get('rounds')} round(s), few-shot "
                     f"{(cfg.get('constitution') or {}).get('fewshot')}; max new tokens: answer "
                     f"{sa.get('max_new_tokens')}, critique {(cfg.get('critique') or {}).get('critique_max_new_tokens')}, "
                     f"revision {(cfg.get('critique') or {}).get('revision_max_new_tokens')}"),
        ("sampler", f"{sa.get('backend')}, temperature {sa.get('temperature')}, top_p {sa.get('top_p')}"),
        ("training", f"{tr.get('method')}" + (" + LoRA" if (tr.get("lora") or {}).get("enabled") else "")
                     + f", preferences {(cfg.get('preferences') or {}).get('source')}"),
        ("probe suite", f"{ps.get('name', '–')} v{ps.get('version', '–')}: {ps.get('items', '–')} items, "
                        f"{len(ps.get('dimensions') or [])} dimensions"),
        ("monitor", f"alpha {mo.get('alpha')}, min_effect {mo.get('min_effect')}, activation_shift "
                    f"{mo.get('activation_shift')}, gate {'on' if mo.get('gate') else 'off'}"),
        ("report_to", str(cfg.get("report_to", "none"))),
    ]
    return ("<h2>Configuration</h2><div class='scroll'><table>"
            + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows) + "</table></div>"
            "<p class='note'>The whole resolved config is in <a href='manifest.json'>manifest.json</a>.</p>")


def _generations_html(d: dict) -> str:
    e = html.escape
    rows = []
    for name, gm in d["gen_manifests"].items():
        rep = d["reports"].get(name)
        al = [a for a in (rep or {}).get("alerts", []) if a.get("candidate") == name]
        n_alert = sum(a["level"] == "alert" for a in al)
        n_watch = sum(a["level"] == "watch" for a in al)
        n_imp = sum(a.get("candidate") == name for a in (rep or {}).get("improvements", []))
        data = ((gm.get("stages") or {}).get("data") or {}).get("counts") or {}
        train = ((gm.get("stages") or {}).get("train") or {}).get("counts") or {}
        links = (f"<a href='{name}/drift/report.html'>report</a> · <a href='{name}/drift/report.md'>md</a> · "
                 f"<a href='{name}/drift/report.json'>json</a>") if rep else "–"
        tx = f" · <a href='#tx-{name}'>transcripts</a>" if name in d["transcripts"] else ""
        loss = (f"{fmt(train.get('first_loss'), 3)} → {fmt(train.get('last_loss'), 3)}"
                if train.get("last_loss") is not None else "–")
        rows.append(f"<tr><td>{name}</td><td>{e(str(gm.get('status', '–')))}</td>"
                    f"<td class='{'alert' if n_alert else 'ok' if rep else ''}'>{n_alert if rep else '–'}</td>"
                    f"<td class='{'watch' if n_watch else ''}'>{n_watch if rep else '–'}</td>"
                    f"<td>{n_imp if rep else '–'}</td>"
                    f"<td>{fmt(data.get('kept'))} / {fmt(data.get('records'))}</td><td>{loss}</td>"
                    f"<td>{links}{tx}</td></tr>")
    return ("<h2>Generations</h2><div class='scroll'><table id='generations'><tr><th>generation</th><th>status</th>"
            "<th>alerts</th><th>watches</th><th>improved</th><th>training rows kept / revised</th>"
            "<th>loss first → last (training the next)</th><th>pages</th></tr>" + "".join(rows) + "</table></div>")


def _trajectories_html(d: dict) -> str:
    e, rep = html.escape, d["latest"]
    if not rep:
        return "<h2>Trajectories</h2><p>No drift report yet.</p>"
    s = rep["settings"]
    out = ["<h2>Value dimensions across generations</h2>",
           f"<p class='note'>Mean P(aligned) on the held-out probes, 95% CI over items, from "
           f"{e(rep['generations'][-1])}'s drift report. {e(value_scale_note(s['min_effect']))} Triangles: an alert, "
           "watch or improvement on that dimension at that generation (any instrument; listed below).</p>",
           value_grid(value_panels(rep, d["alerts"]), s["min_effect"])]
    listed = sorted((a for a in d["alerts"]), key=lambda a: (a["candidate"], a["level"] != "alert", a["dimension"]))
    if listed:
        out.append("<div class='scroll'><table id='alerts'><tr><th>generation</th><th>level</th><th>dimension</th>"
                   "<th>instrument</th><th>comparison</th><th>shift</th><th>p (Holm)</th><th>detectable shift</th></tr>")
        for a in listed:
            out.append(f"<tr class='{e(a['level'])}'><td>{e(a['candidate'])}</td><td>{e(a['level'])}</td>"
                       f"<td>{e(a['dimension'])}</td><td>{e(a['instrument'])}</td><td>{e(a.get('comparison', ''))}</td>"
                       f"<td>{fmt(a.get('delta'), sign=True)}</td><td>{fmt(a.get('p_holm', a.get('p')))}</td>"
                       f"<td>{fmt(a.get('mde'))}</td></tr>")
        out.append("</table></div>")
    else:
        out.append("<p class='ok'>No alerts, watches or improvements in any generation.</p>")
    names = rep["generations"]
    if any(rep["activations"].get(n) for n in names[1:]):
        thr = s.get("activation_shift", 0.0)
        dims = list(dict.fromkeys(dm for n in names for dm in (rep["activations"].get(n) or {})))
        panels = [{"title": dm, "centre": 0.0, "band": (-thr, thr) if thr else None,
                   "series": {"projection shift": [(0, 0.0, None, None)] + [
                       (k, r["projection_shift"], *(r.get("ci95") or (None, None)))
                       for k, n in enumerate(names) if k for r in [(rep["activations"].get(n) or {}).get(dm) or {}]
                       if r.get("projection_shift") is not None]},
                   "marks": [(names.index(a["candidate"]), a["level"]) for a in d["alerts"]
                             if a.get("instrument") == "activation" and a["dimension"] == dm
                             and a["candidate"] in names]} for dm in dims]
        out.append("<h2>Activation shifts across generations</h2><p class='note'>Paired shift of each item's projection "
                   "on the frozen gen-0 direction, in units of gen-0's aligned–misaligned gap (+ = toward the trait), 95% "
                   f"CI; one scale for all panels; grey: within ± monitor.activation_shift ({thr:g}), which cannot "
                   "alert.</p>")
        out.append(plots.grid(panels, ylabel="shift (× gen-0 gap)", min_span=4 * thr if thr else 1.0,
                              band_label=f"± activation_shift {thr:g}"))
    out.append(_power_html(rep))
    if rep["embedding"]:
        out.append("<h2>External embedding drift</h2><p class='note'>Biased MMD² against gen-000 over its swap-null "
                   "mean (about 1 is noise); grey: the swap null's 95th percentile.</p>")
        out.append(plots.drift_vs_null(embedding_points(rep), threshold=s.get("embedding_effect"),
                                       ylabel="MMD² ÷ swap-null mean"))
    if rep["collapse"]:
        rel = s.get("collapse_rel", 0.2)
        out.append(f"<h2>Collapse metrics</h2><p class='note'>Relative change against gen-000, one scale for all panels; "
                   f"grey: within ±{100 * rel:g}% (monitor.collapse_rel), where no watch is raised.</p>")
        out.append(collapse_grid(collapse_panels({n: c["values"] for n, c in rep["collapse"].items()}, names,
                                                 d["alerts"]), rel))
    return "".join(out)


def _power_html(rep: dict) -> str:
    """Per generation, the smallest shift the monitor could have detected (MDE at 80% power, from
    that generation's paired shifts against gen-000) over the dimensions, and the tests that can
    never alert at these item counts."""
    pw = rep.get("power") or {}
    names, eff = rep["generations"], rep["settings"]["min_effect"]
    rows, pts = [], []
    for k, n in enumerate(names):
        if not k:
            continue
        mdes = sorted(r["mde"] for v in rep["dimensions"].values()
                      for r in [((v.get(n) or {}).get("contrast") or {}).get("vs_reference") or {}]
                      if r.get("mde") is not None)
        med = mdes[len(mdes) // 2] if mdes else None
        rows.append(f"<tr><td>{n}</td><td>{len(mdes)}</td><td>{fmt(med)}</td>"
                    f"<td>{f'{mdes[0]:.3f} – {mdes[-1]:.3f}' if mdes else '–'}</td></tr>")
        if med is not None:
            pts.append((k, med, mdes[0], mdes[-1]))
    fams = ", ".join(f"{f} m = {m}" for f, m in (pw.get("families") or {}).items())
    under = pw.get("underpowered") or []
    out = ["<h2>Monitor power per generation</h2>",
           f"<p class='note'>Holm families: {html.escape(fams) or '–'} at alpha {pw.get('alpha', '–')}. "
           + (f"<b>{len(under)} test(s) cannot reach it at these item counts and can never alert.</b> "
              if under else "Every test can reach it. ")
           + f"Minimum detectable shift in P(aligned) (contrast items, 80% power, from each generation's paired "
             f"shifts against gen-000; the alert threshold min_effect is {eff:g}); '–' where too few items give "
             "no estimate.</p>"]
    if pts:
        out.append(plots.grid([{"title": "minimum detectable shift: median, bars min–max over dimensions",
                                "series": {"MDE": pts}, "band": (0.0, eff)}], ylabel="ΔP(aligned)", min_span=2 * eff,
                              bounds=(0.0, 1.0), ncols=2, band_label=f"below min_effect {eff:g}"))
    out.append("<div class='scroll'><table id='power'><tr><th>generation</th><th>dimensions with an MDE</th>"
               "<th>median MDE</th><th>range</th></tr>" + "".join(rows) + "</table></div>")
    return "".join(out)


def _time_html(d: dict) -> str:
    e, t = html.escape, d["timings"]
    if not t:
        return ""
    gens = list(t)
    stages = sorted({s for g in t.values() for s in g["stages"]},
                    key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES))
    fig = plots.stacked_bars(gens, {s: [(t[g]["stages"].get(s) or {}).get("seconds") or 0.0 for g in gens]
                                    for s in stages}, xlabel="seconds")
    head = "".join(f"<th>{e(s)}</th>" for s in stages)
    rows = []
    for g in gens:
        cells = []
        for s in stages:
            st = t[g]["stages"].get(s)
            cells.append("<td>–</td>" if st is None else f"<td>{fmt(st.get('seconds'), 1)}"
                         + (f"<br><span class='note'>{st['tokens_per_s']:.1f} tok/s</span>"
                            if st.get("tokens_per_s") else "") + "</td>")
        rows.append(f"<tr><td>{g}</td>{''.join(cells)}<td>{fmt(t[g].get('wall_s'), 1)}</td>"
                    f"<td>{fmt(t[g].get('monitor_fraction'))}</td></tr>")
    return ("<h2>Where the time went</h2><p class='note'>Seconds per finished stage of each generation, from its "
            "manifest (tokens/s where the stage samples).</p>" + fig
            + f"<div class='scroll'><table id='timings'><tr><th>generation</th>{head}<th>wall s</th>"
              "<th>monitor share</th></tr>" + "".join(rows) + "</table></div>")


def _transcripts_html(d: dict) -> str:
    e = html.escape
    if not d["transcripts"]:
        return ""
    out = ["<h2>Transcripts</h2>",
           f"<p class='note'>What each generation wrote and what the next one was trained on. To keep this page quick "
           f"to open, each generation shows at most {TRANSCRIPTS_PER_GEN} transcripts and the page at most "
           f"{TRANSCRIPTS_TOTAL} (a seeded random sample; rows a data screen flagged come first), {PAGE_ROWS} per "
           f"page, each text cut at {TEXT_CHARS} characters. Every transcript is in <code>gen-NNN/critiques.jsonl</code>; "
           "training rows are in <code>gen-NNN/data/sft</code>. Filters apply to the rows shown.</p>"]
    for name, tx in d["transcripts"].items():
        principles = sorted({r["principle"] for row in tx["rows"] for r in row["rounds"]})
        sources = sorted({row["source"] for row in tx["rows"]})
        sample = ("all" if tx["shown"] == tx["total"] else
                  f"a sample of {tx['shown']} (seeded)")
        out.append(f"<section class='tx' id='tx-{name}'><h3>{name}: {sample} of {tx['total']} transcripts"
                   + (f" · {tx['flagged']} flagged by the screen" if tx["screen"] else "") + "</h3>")
        stages = d["gen_manifests"].get(name, {}).get("stages") or {}
        data = (stages.get("data") or {}).get("counts")
        usage = (stages.get("critique") or {}).get("counts", {}).get("principle_usage") or {}
        if data:
            out.append(f"<p class='note'>All {data.get('records')} rows: {data.get('kept')} kept for training; dropped "
                       + ", ".join(f"{data.get(f'dropped_{r}', 0)} {r}" for r in ("empty", "degenerate", "unchanged"))
                       + ". Principles or sections drawn: "
                       + e(", ".join(f"{p} {n}" for p, n in sorted(usage.items(), key=lambda x: -x[1])) or "–")
                       + ".</p>")
        out.append("<div class='filters'>principle <select data-f='principle'><option value=''>all</option>"
                   + "".join(f"<option value='{e(p)}'>{e(p)}</option>" for p in principles)
                   + "</select> source <select data-f='source'><option value=''>all</option>"
                   + "".join(f"<option value='{e(s)}'>{e(s)}</option>" for s in sources)
                   + "</select> training <select data-f='status'><option value=''>all</option>"
                     "<option value='kept'>kept</option><option value='dropped'>dropped</option>"
                     "<option value='pending'>not built yet</option></select>"
                   + (" <label><input type='checkbox' data-f='flagged'> flagged only</label>" if tx["screen"] else "")
                   + " <button data-p='-1'>◀</button> <span class='pg'></span> <button data-p='1'>▶</button></div>")
        for row in tx["rows"]:
            out.append(_transcript_html(row))
        out.append("</section>")
    return "".join(out)


def _transcript_html(row: dict) -> str:
    e = html.escape
    principles = " ".join(r["principle"] for r in row["rounds"])
    cls = "t" + (" flagged" if row["flagged"] else "") + f" st-{row['status']}"
    head = (f"#{row['row']} · <code>{e(row['prompt_id'])}</code> · {e(row['source'])}"
            + (f"/{e(row['category'])}" if row["category"] else "")
            + f" · {e(principles) or '–'} · <span class='st'>{e(row['status'])}: {e(row['reason'])}</span>"
            + (" · <b class='flag'>flagged</b>" if row["flagged"] else "")
            + f"<br><span class='q'>{e(row['prompt'][:140])}</span>")
    body = [f"<p><b>Prompt</b></p><pre>{e(_cut(row['prompt']))}</pre>",
            f"<p><b>Initial answer</b></p><pre>{e(_cut(row['initial']))}</pre>"]
    for j, r in enumerate(row["rounds"]):
        body.append(f"<p><b>Critique, round {j + 1}</b> (principle <code>{e(r['principle'])}</code>)</p>"
                    f"<pre>{e(_cut(r['critique']))}</pre><p><b>Revision, round {j + 1}</b></p>"
                    f"<pre>{e(_cut(r['revision']))}</pre>")
    if row["screen"]:
        body.append("<p><b>Data screen</b> (projection differences, in units of the gen-0 gap)</p><pre>"
                    + e("\n".join(json.dumps(_rounded(r), ensure_ascii=False) for r in row["screen"])[:TEXT_CHARS])
                    + "</pre>")
    return (f"<details class='{cls}' data-principle='{e(principles)}' data-source='{e(row['source'])}' "
            f"data-status='{e(row['status'])}' data-flagged='{'1' if row['flagged'] else '0'}'>"
            f"<summary>{head}</summary>{''.join(body)}</details>")


_CSS = """.filters{margin:.4em 0;font-size:13px}.filters select{max-width:260px}
details.t{border:1px solid #ddd;border-radius:3px;margin:3px 0;padding:2px 8px;font-size:13px}
details.t summary{cursor:pointer}details.t .q{color:#555}details.t.st-dropped{background:#fafafa}
details.t .st{font-weight:600}details.t.st-kept .st{color:#1d7a32}details.t.st-dropped .st{color:#a33}
details.t.flagged{border-left:4px solid #d62728}.flag{color:#d62728}
details.t pre{background:#f7f7f7;padding:6px;margin:2px 0 6px}"""

# Ours, not generated: filters and pages each generation's transcripts by their data- attributes.
_SCRIPT = """document.querySelectorAll('section.tx').forEach(function(sec){
var rows=Array.prototype.slice.call(sec.querySelectorAll('details.t')),page=0,per=%d;
var sel=function(f){return sec.querySelector('[data-f='+f+']');};
function match(r){var p=sel('principle').value,s=sel('source').value,t=sel('status').value,f=sel('flagged');
return (!p||(' '+r.dataset.principle+' ').indexOf(' '+p+' ')>=0)&&(!s||r.dataset.source===s)&&
(!t||r.dataset.status===t)&&(!f||!f.checked||r.dataset.flagged==='1');}
function show(){var m=rows.filter(match),n=Math.max(1,Math.ceil(m.length/per));page=Math.min(Math.max(page,0),n-1);
rows.forEach(function(r){r.style.display='none';});
m.slice(page*per,(page+1)*per).forEach(function(r){r.style.display='';});
sec.querySelector('.pg').textContent=m.length?('page '+(page+1)+' of '+n+' ('+m.length+' match)'):'no match';}
sec.querySelectorAll('[data-f]').forEach(function(x){x.addEventListener('change',function(){page=0;show();});});
sec.querySelectorAll('[data-p]').forEach(function(b){b.addEventListener('click',function(){
page+=parseInt(b.dataset.p,10);show();});});show();});""" % PAGE_ROWS


def render(d: dict) -> str:
    body = [_status_html(d), _config_html(d["manifest"]), _generations_html(d), _trajectories_html(d),
            _time_html(d), _transcripts_html(d)]
    return page(f"selftrain run: {d['name']}", "".join(body), css=_CSS, script=_SCRIPT)
