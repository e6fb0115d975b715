"""The self-training loop: generation k -> probe, report, sample, critique, data, train -> k+1.

Each stage writes under runs/<run>/gen-<k>/ and is marked done in gen-<k>/manifest.json only
after its outputs are complete, so re-running the same command on the same folder skips
finished stages. Generation 0 is the base model; `generations=G` trains G times and probes
all of gen-000..gen-G. The monitor (probe + report) runs first in each generation, so a
generation's drift report exists before its data is used for anything.
"""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from . import UserError, models
from .constitution import Constitution
from .critique import critique_revise
from .data import build_datasets
from .monitor import probe_model
from .probes import guard
from .probes.suites import load_suite
from .prompts import load_prompts, prompts_hash
from .records import (MANIFEST, Manifest, gen_dir, now, package_versions, read_json, read_jsonl, sha256_tree,
                      write_jsonl)
from .report import generation_report
from .sample import SamplingParams, sample_stage
from .schema import monitor_settings, validate
from .serving import check_engine, close_sampler, make_sampler, preflight
from .train import sft_config, train_sft
from .train_worker import launch

log = logging.getLogger(__name__)
MONITOR_STAGES = ("probe", "report", "guard")


class Generation:
    """One generation's folder, manifest and (lazily loaded) model."""

    def __init__(self, run_dir: Path, k: int, model_path: str, parent: str | None, cfg):
        self.k, self.dir, self.model_path, self.cfg = k, gen_dir(run_dir, k), model_path, cfg
        self.manifest = Manifest(self.dir / MANIFEST, {"generation": k, "model": model_path, "parent": parent})
        self._model = self._tok = None

    def model(self):
        if self._model is None:
            self._tok = models.load_tokenizer(self.model_path, self.cfg.model.trust_remote_code)
            self._model = models.load_model(self.model_path, self.cfg.model.dtype, self.cfg.model.trust_remote_code)
        return self._model, self._tok

    def release(self) -> None:
        self._model = self._tok = None
        gc.collect()


def _params(cfg, max_new_tokens: int, seed: int) -> SamplingParams:
    s = cfg.sampler
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                          repetition_penalty=s.repetition_penalty, seed=seed)


def _check_resume(manifest: Manifest, config: dict) -> None:
    old = manifest.data.get("config")
    if old is None or old == config:
        return
    flat_old, flat_new = _flatten(old), _flatten(config)
    # keys whose value changed first, then keys only one of the two configs has
    diff = sorted((k not in flat_old or k not in flat_new, k) for k in set(flat_old) | set(flat_new)
                  if flat_old.get(k) != flat_new.get(k))
    diff = [k for _, k in diff]
    shown = ", ".join(diff[:10]) + (f" and {len(diff) - 10} more" if len(diff) > 10 else "")
    raise UserError(f"{manifest.path}: this run folder was started with a different config "
                    f"(differs in: {shown}); use a new run folder")


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run(cfg, run_dir: Path) -> dict:
    """Run (or resume) a whole self-training experiment in `run_dir`. Returns the run manifest."""
    import datasets

    datasets.disable_progress_bars()  # one bar per stage is ours; datasets' save/map bars are noise
    run_dir = Path(run_dir)
    validate(cfg)
    check_engine(cfg.sampler)  # vllm installed, GPUs for tensor parallel: before any file is read
    constitution = Constitution.load(cfg.constitution.path)
    prompts = load_prompts(cfg.prompts, cfg.seed)
    full_suite = load_suite(cfg.probes.suite)
    suite = full_suite.select(cfg.probes.dimensions, cfg.probes.max_items_per_dimension)
    base = models.resolve(cfg.model.name_or_path)
    preflight(cfg.sampler, base)  # the server answers and serves gen-0, before any model loads
    sft_config(cfg.train, run_dir / "gen-000" / "train", cfg.seed)  # TRL's own checks, before any model loads

    config = OmegaConf.to_container(cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir / MANIFEST)
    _check_resume(manifest, config)
    manifest.update(
        config=config, status="running", started=manifest.data.get("started", now()),
        constitution={"name": constitution.name, "kind": constitution.kind, "path": constitution.path,
                      "sha256": constitution.sha256, "principles": [p.id for p in constitution.principles]},
        prompts={"count": len(prompts), "sha256": prompts_hash(prompts),
                 "by_source": {s.name: sum(p.source == s.name for p in prompts) for s in cfg.prompts.sources}},
        probe_suite={"name": suite.name, "version": suite.version, "sha256": suite.sha256,
                     "items": len(suite.items), "dimensions": list(suite.dimensions)},
        seeds={"seed": cfg.seed}, versions=package_versions(), base_model=base)
    try:
        for k in range(cfg.generations + 1):
            model_path = base if k == 0 else str(gen_dir(run_dir, k) / "model")
            parent = None if k == 0 else (base if k == 1 else str(gen_dir(run_dir, k - 1) / "model"))
            gate = _generation(cfg, run_dir, Generation(run_dir, k, model_path, parent, cfg), constitution,
                               prompts, suite, full_suite.texts(), last=(k == cfg.generations))
            manifest.update(generations_done=k + 1)
            if gate:
                manifest.update(status="gated", gate=gate, finished=now(),
                                final_report=str(gen_dir(run_dir, k) / "drift" / "report.md"))
                return manifest.data
    except BaseException as e:
        manifest.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                        error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    manifest.update(status="done", finished=now(),
                    final_report=str(gen_dir(run_dir, cfg.generations) / "drift" / "report.md"))
    return manifest.data


def _generation(cfg, run_dir, gen: Generation, constitution, prompts, suite, probe_texts: list[str],
                last: bool) -> dict | None:
    """Run generation k's stages; return the gate's record if the monitor stopped the loop."""
    m, k = gen.manifest, gen.k
    if "model_sha256" not in m.data:
        m.update(model_sha256=sha256_tree(Path(gen.model_path)) if Path(gen.model_path).exists() else None)
    t0 = time.perf_counter()

    if not m.stage_done("probe"):
        with m.stage("probe") as counts:
            model, tok = gen.model()
            counts.update(probe_model(model, tok, suite, cfg.probes, cfg.monitor, gen.dir,
                                      reference=None if k == 0 else gen_dir(run_dir, 0),
                                      seed=cfg.seed * 100 + k, batch_size=cfg.sampler.batch_size))
            counts["dimensions"] = len(suite.dimensions)
    if not m.stage_done("report"):
        with m.stage("report") as counts:
            rep = generation_report(run_dir, k, monitor_settings(cfg.monitor))
            counts.update(alerts=sum(a["level"] == "alert" for a in rep["alerts"]),
                          watches=sum(a["level"] == "watch" for a in rep["alerts"]))
    if cfg.monitor.gate and not last and k > 0:
        rep = read_json(gen.dir / "drift" / "report.json")
        fired = [a for a in rep["alerts"] if a["level"] == "alert" and a["comparison"] == "cumulative"]
        if fired:
            gate = {"stopped_before": f"gen-{k + 1:03d}", "at": f"gen-{k:03d}",
                    "reason": "cumulative alert: " + ", ".join(f"{a['dimension']} ({a['instrument']})"
                                                               for a in fired)}
            gen.release()
            m.update(status="gated", gate=gate)
            log.warning("monitor gate: %s; stopping before %s", gate["reason"], gate["stopped_before"])
            return gate

    if not last:
        sampler = None
        if not m.stage_done("sample"):
            with m.stage("sample") as counts:
                sampler = make_sampler(cfg.sampler, gen.model, gen.model_path, cfg.model)
                recs = sample_stage(sampler, prompts, _params(cfg, cfg.sampler.max_new_tokens, cfg.seed * 100 + k))
                write_jsonl(gen.dir / "samples.jsonl", recs)
                counts.update(prompts=len(recs), sampler=sampler.describe())
        if not m.stage_done("critique"):
            with m.stage("critique") as counts:
                sampler = sampler or make_sampler(cfg.sampler, gen.model, gen.model_path, cfg.model)
                recs = critique_revise(
                    sampler, constitution, read_jsonl(gen.dir / "samples.jsonl"), cfg.critique.rounds,
                    cfg.constitution.fewshot,
                    _params(cfg, cfg.critique.critique_max_new_tokens, cfg.seed * 100 + k + 1),
                    _params(cfg, cfg.critique.revision_max_new_tokens, cfg.seed * 100 + k + 2), seed=cfg.seed + k)
                write_jsonl(gen.dir / "critiques.jsonl", recs)
                usage: dict[str, int] = {}
                for r in recs:
                    for rd in r["rounds"]:
                        usage[rd["principle"]] = usage.get(rd["principle"], 0) + 1
                counts.update(records=len(recs), rounds=cfg.critique.rounds, principle_usage=usage)
        close_sampler(sampler)
        gen.release()
        if not m.stage_done("data"):
            with m.stage("data") as counts:
                counts.update(build_datasets(read_jsonl(gen.dir / "critiques.jsonl"), gen.dir / "data",
                                             cfg.data.min_words, cfg.data.max_top_trigram_share))
                if counts["kept"] == 0:
                    raise UserError(f"generation {k}: every revision was dropped ({counts}); "
                                    "raise critique.revision_max_new_tokens or check the model")
        if not m.stage_done("guard"):
            with m.stage("guard") as counts:
                counts["texts_checked"] = guard.check(gen.dir / "data", probe_texts)
                counts["probe_texts"] = len(probe_texts)
        if not m.stage_done("train"):
            with m.stage("train") as counts:
                args = dict(parent=gen.model_path, data_dir=gen.dir / "data" / "sft",
                            out_model=gen_dir(run_dir, k + 1) / "model", train_cfg=cfg.train, model_cfg=cfg.model,
                            seed=cfg.seed + k, work_dir=gen.dir / "train")
                counts.update(train_sft(**args) if cfg.train.num_processes == 1 else
                              launch("train_sft", cfg.train.num_processes, cfg.train.accelerate_config, **args))
    gen.release()
    stages = m.data["stages"]
    total = sum(s.get("seconds", 0) for s in stages.values())
    monitor = sum(stages[s].get("seconds", 0) for s in MONITOR_STAGES if s in stages)
    m.update(status="done", wall_s=round(time.perf_counter() - t0, 3),
             monitor_s=round(monitor, 3), monitor_fraction=round(monitor / total, 4) if total else None)
    return None
