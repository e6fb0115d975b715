"""Run every benchmark and write results.json and results.md.

    python -m benchmarks.run [--quick] [--out DIR] [--model NAME_OR_PATH] [--repeats N] [--only SECTIONS]

Sections, in one process on one model (the embedded SmolLM2-135M-Instruct by default):
  hardware   memory bandwidth (copy), fp32 matmul GFLOP/s, the decode roofline
  sampling   pipeline sample stage vs bare batched generate vs one prompt at a time (+ ablations)
  critique   critique-revision tokens/s with and without the shared-prefix KV cache
  sft        pipeline train_sft vs a bare TRL SFTTrainer, same data and settings (+ padding-free)
  smoke      the whole smoke experiment (or --experiment NAME) through the CLI: wall time, peak
             memory, per-stage seconds and tokens/s, and the monitor's share of a generation
--quick shrinks every size so the runner finishes in a few minutes (CI checks it works; its
numbers mean nothing). Timings on a shared machine are noisy: use --repeats on a quiet one.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from selftrain.run.layout import STAGES

SECTIONS = ("hardware", "sampling", "critique", "sft", "smoke")
# Small budgets for --quick's smoke run (the tests' tiny-model settings)
QUICK_SMOKE = ["generations=1", "sampler.max_new_tokens=8", "critique.critique_max_new_tokens=8",
               "critique.revision_max_new_tokens=8", "probes.max_items_per_dimension=4", "data.min_words=1",
               "monitor.embedding_prompts=4", "monitor.permutations=50", "monitor.cue_items=2",
               "monitor.heldout_paragraphs=2", "monitor.allow_underpowered=true"]
TARGETS = {"sampling_vs_bare_batched": 0.95, "sampling_vs_one_at_a_time": 5.0, "sampling_of_roofline": 0.40,
           "monitor_fraction_max": 0.20, "screen_fraction_max": 0.05, "sft_vs_bare": 0.95}


def machine() -> dict:
    import torch
    import transformers
    import trl

    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "memory_gib": mem, "cuda": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "load_avg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def targets(res: dict) -> dict:
    """Each target: the measured value, the bar, and whether it was met (None: not measured)."""
    s, sf, hw, sm = res.get("sampling", {}), res.get("sft", {}), res.get("hardware", {}), res.get("smoke", {})

    def row(value, bar, higher=True):
        return {"value": value, "target": bar, "met": None if value is None else (value >= bar if higher else value <= bar)}
    return {
        "sampling_vs_bare_batched": row(s.get("pipeline_vs_bare_batched"), TARGETS["sampling_vs_bare_batched"]),
        "sampling_vs_one_at_a_time": row(s.get("pipeline_vs_one_at_a_time"), TARGETS["sampling_vs_one_at_a_time"]),
        # against the roofline measured around the pipeline arm where there is one (see sampling.bracketed)
        "sampling_of_roofline": row(hw.get("pipeline_sampling_of_roofline_around", hw.get("pipeline_sampling_of_roofline")),
                                    TARGETS["sampling_of_roofline"]),
        "monitor_fraction": row(sm.get("monitor_fraction_of_generation"), TARGETS["monitor_fraction_max"], False),
        "screen_fraction": row(sm.get("screen_fraction_of_generation"), TARGETS["screen_fraction_max"], False),
        "sft_vs_bare": row(sf.get("pipeline_vs_bare"), TARGETS["sft_vs_bare"]),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the runner works")
    ap.add_argument("--out", type=Path, help="output folder (default runs/bench/<UTC date_time>)")
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="model name or folder")
    ap.add_argument("--repeats", type=int, help="interleaved repeats of every A/B arm (median reported)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own, one per core)")
    ap.add_argument("--no-ablations", action="store_true", help="skip the optimisation ablations")
    ap.add_argument("--experiment", default="smoke",
                    help="the experiment the smoke section runs: `default` judges the monitor's share on "
                         "the default experiment's generations (about 25 minutes on 2 CPU cores)")
    ap.add_argument("--static-cache", action="store_true", help="add the bare static-cache arm to a full run")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")

    import torch

    from . import common, critique, hardware, sampling, sft, smoke

    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the smoke run's subprocess too

    sizes = common.QUICK if a.quick else common.FULL
    if a.repeats:
        sizes = dataclasses.replace(sizes, repeats=a.repeats)
    if a.static_cache:
        sizes = dataclasses.replace(sizes, static_cache=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    out = a.out or Path("runs") / "bench" / stamp
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": a.quick,
                 "model": a.model, "sizes": dataclasses.asdict(sizes), "machine": machine(), "sections": only}
    ablations = not a.no_ablations
    path, model, tok = common.load(a.model)
    res["model_info"] = {"path": path, "params": common.n_params(model), "weight_bytes": common.weight_bytes(model)}
    prompts = common.prompts(max(sizes.prompts, sizes.critique_prompts))

    def save():
        from selftrain.run.records import write_json, write_text

        res["targets"] = targets(res)
        write_json(out / "results.json", res)
        write_text(out / "results.md", render(res))

    def section(name, fn):
        if name not in only:
            return
        print(f"benchmarks: {name} ...", file=sys.stderr, flush=True)
        with common.timer(res.setdefault(name, {}), "section_s"):
            res[name].update(fn())
        save()

    section("hardware", lambda: {"copy": hardware.copy_bandwidth(sizes.copy_mb),
                                 "matmul": hardware.matmul_flops(sizes.matmul_n)})
    section("sampling", lambda: sampling.run(model, tok, prompts[:sizes.prompts], sizes, ablations))
    _rooflines(res, sizes)
    section("critique", lambda: critique.run(model, tok, prompts[:sizes.critique_prompts], sizes))
    model = None  # free the sampling model before SFT loads its own
    section("sft", lambda: sft.run(path, tok, prompts, sizes, ablations))
    section("smoke", lambda: smoke.run(out, None if a.model == common.EMBEDDED else a.model,
                                       QUICK_SMOKE if a.quick else [], experiment=a.experiment))
    save()
    print(f"benchmarks: wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def _rooflines(res: dict, sizes) -> None:
    """The decode roofline from the hardware section, and the pipeline's share of it (also against the
    matmul speed measured around the pipeline arm, since the CPU's speed drifts)."""
    from . import common, hardware

    if "hardware" not in res:
        return
    hw = res["hardware"]
    hw["roofline"] = hardware.decode_roofline(hw["copy"]["gb_per_s"], hw["matmul"]["gflop_per_s"],
                                              res["model_info"]["weight_bytes"], res["model_info"]["params"],
                                              sizes.batch_size)
    arm = res.get("sampling", {}).get("arms", {}).get("pipeline", {})
    pipe = arm.get("tokens_per_s")
    hw["pipeline_sampling_of_roofline"] = common.ratio(pipe, hw["roofline"]["roofline_tok_s"])
    if arm.get("matmul_gflop_per_s_around"):
        # the same, against the matmul throughput measured just before and after the pipeline arm
        hw["roofline_around_pipeline"] = hardware.decode_roofline(
            hw["copy"]["gb_per_s"], arm["matmul_gflop_per_s_around"], res["model_info"]["weight_bytes"],
            res["model_info"]["params"], sizes.batch_size)
        hw["pipeline_sampling_of_roofline_around"] = common.ratio(
            pipe, hw["roofline_around_pipeline"]["roofline_tok_s"])


def _c(x, nd=2):
    if x is None:
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def render(res: dict) -> str:
    m = res["machine"]
    L = [f"# selftrain benchmarks{' (quick mode: sizes too small to mean anything)' if res['quick'] else ''}", "",
         f"{res['date']} · {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gib']} GiB, "
         f"{'CUDA' if m['cuda'] else 'no GPU'} · load average at start {_c(m['load_avg_at_start'])} · "
         f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']} · model `{res['model']}` "
         f"({res.get('model_info', {}).get('params', 0) / 1e6:.1f}M params) · repeats {res['sizes']['repeats']}", "",
         "## Targets", "", "| target | measured | bar | met |", "|---|---|---|---|"]
    names = {"sampling_vs_bare_batched": "sampling ÷ bare batched generate (tokens/s)",
             "sampling_vs_one_at_a_time": "sampling ÷ one prompt at a time (tokens/s)",
             "sampling_of_roofline": "sampling ÷ decode roofline", "monitor_fraction": "monitor ÷ generation wall time",
             "screen_fraction": "data screen ÷ generation wall time",
             "sft_vs_bare": "pipeline SFT ÷ bare SFTTrainer (tokens/s)"}
    for k, t in res.get("targets", {}).items():
        op = "≤" if k in ("monitor_fraction", "screen_fraction") else "≥"
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        L.append(f"| {names[k]} | {_c(t['value'], 3)} | {op} {t['target']} | {met} |")
    hw = res.get("hardware")
    if hw and "copy" in hw:
        r = hw.get("roofline", {})
        L += ["", "## Hardware", "", "| measure | value |", "|---|---|",
              f"| copy bandwidth (read + write, {hw['copy']['tensor_mib']} MiB) | {hw['copy']['gb_per_s']} GB/s |",
              f"| fp32 matmul ({hw['matmul']['n']}²) | {hw['matmul']['gflop_per_s']} GFLOP/s |",
              f"| weights streamed per decoding step | {r.get('weight_gb')} GB |",
              f"| decode roofline at batch {r.get('batch')} | {r.get('roofline_tok_s')} tokens/s "
              f"({r.get('bound')}-bound; bandwidth bound {r.get('bandwidth_bound_tok_s')}, compute bound "
              f"{r.get('compute_bound_tok_s')}) |",
              f"| pipeline sampling ÷ roofline | {_c(hw.get('pipeline_sampling_of_roofline'), 3)} |"]
        ra = hw.get("roofline_around_pipeline")
        if ra:
            L += [f"| fp32 matmul measured around the pipeline arm (better of before and after) | "
                  f"{ra['compute_bound_tok_s'] * 2 * ra['params'] / 1e9:.2f} GFLOP/s |",
                  f"| decode roofline from it | {ra['roofline_tok_s']} tokens/s ({ra['bound']}-bound) |",
                  f"| pipeline sampling ÷ that roofline (the target's measure) | "
                  f"{_c(hw.get('pipeline_sampling_of_roofline_around'), 3)} |"]
    for sec, title in (("sampling", "Sampling"), ("critique", "Critique and revision"), ("sft", "SFT")):
        d = res.get(sec)
        if not d or "arms" not in d:
            continue
        L += ["", f"## {title}", "", "Settings: " + ", ".join(f"{k} {v}" for k, v in d["settings"].items()), "",
              "| arm | tokens/s | seconds | tokens | note |", "|---|---|---|---|---|"]
        for arm, v in d["arms"].items():
            if "error" in v:
                L.append(f"| {arm} | – | – | – | failed: {v['error']} |")
                continue
            secs = v.get("seconds", v.get("train_runtime_s"))
            toks = v.get("new_tokens", d["settings"].get("tokens"))
            note = []
            if "vs_pipeline" in v:
                note.append(f"{v['vs_pipeline']}× pipeline")
            if "wall_tokens_per_s" in v:
                note.append(f"{v['wall_tokens_per_s']} tokens/s wall (load, train, save: {v['wall_s']} s)")
            if v.get("prefix_tokens_reused"):
                note.append(f"{v['prefix_tokens_reused']} of {v['prompt_tokens']} prompt tokens from the shared cache")
            L.append(f"| {arm} | {_c(v['tokens_per_s'])} | {_c(secs)} | {_c(toks)} | {'; '.join(note)} |")
        extra = {k: v for k, v in d.items() if k not in ("settings", "arms", "section_s")}
        L += [""] + [f"- {k.replace('_', ' ')}: {_c(v, 3)}" for k, v in extra.items()]
    sm = res.get("smoke")
    if sm:
        L += ["", "## Smoke experiment", "", f"`{sm.get('command')}`: exit {sm.get('returncode')}, wall "
              f"{sm.get('wall_s')} s, peak RSS {sm.get('peak_rss_mib')} MiB"
              + (f" — failed: {sm['error']}" if sm.get("error") else ""), ""]
        gens = sm.get("generations", {})
        stages = sorted({s for g in gens.values() for s in g["stages"]},
                        key=lambda s: STAGES.index(s) if s in STAGES else 99)
        if gens:
            L += [f"| generation | wall s | monitor share | {' | '.join(stages)} |", "|---|---|---|" + "---|" * len(stages)]
            for n, g in gens.items():
                cells = []
                for s in stages:
                    st = g["stages"].get(s)
                    cells.append("–" if not st else f"{_c(st.get('seconds'), 1)} s" +
                                 (f" ({_c(st['tokens_per_s'], 1)} tok/s)" if st.get("tokens_per_s") else ""))
                L.append(f"| {n} | {_c(g['wall_s'], 1)} | {_c(g['monitor_fraction'], 3)} | {' | '.join(cells)} |")
            L += ["", f"Data screen ÷ generation: {_c(sm.get('screen_fraction_of_generation'), 4)}; steering check at "
                  f"gen-000 (one-off, inside its probe stage of {_c(sm.get('probe_s_gen0'), 1)} s): "
                  f"{_c(sm.get('steering_s'), 1)} s."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
