"""The self-training loop: generation k -> probe, report, sample, critique, data, screen, guard, train -> k+1.

Each stage writes under runs/<run>/gen-<k>/ and is marked done in gen-<k>/manifest.json only
after its outputs are complete, so re-running the same command on the same folder skips
finished stages (and, inside sample and critique, committed chunks: selftrain.run.resume).
Every finished stage records the sha256 of each output it wrote; a resume checks them before
using them, and a generation's model loads only once its producing train stage is done.
Generation 0 is the base model; `generations=G` trains G times and probes
all of gen-000..gen-G. The monitor (probe + report) runs first in each generation, so a
generation's drift report exists before its data is used for anything.
A run holds its folder's lock (selftrain.run.lock) from before it reads the folder until it ends, so
a folder has one writer at a time; the run manifest lists every start under `attempts`.
"""
from __future__ import annotations

import gc
import logging
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from selftrain import UserError, models

from selftrain.run import trackers
from selftrain.constitution import Constitution
from selftrain.stages.critique import critique_stage
from selftrain.analysis.dashboard import write_dashboard
from selftrain.stages.data import build_datasets
from selftrain.run.lineage import config_sha256
from selftrain.run.lock import RunLock
from selftrain.monitor.probe import check_power, probe_model
from selftrain.stages import guard
from selftrain.monitor.suites import load_suite
from selftrain.prompts import load_prompts, prompts_hash
from selftrain.run.records import (MANIFEST, Manifest, config_diff, gen_dir, now, package_versions, read_json, read_jsonl,
                      read_manifest, sha256_tree, write_jsonl)
from selftrain.analysis.drift_report import generation_report
from selftrain.stages.screen import screen_generation
from selftrain.monitor.activations import load_directions
from selftrain.preferences import load_user_preferences
from selftrain.run.resume import (Interrupted, apply_force, check_chunks, check_interrupt, force_target, graceful_interrupts,
                     parse_force, start_over, verify_outputs)
from selftrain.engines.base import SamplingParams, option_first_tokens
from selftrain.stages.sample import sample_stage
from selftrain.config.checks import validate
from selftrain.config.schema import monitor_settings
from selftrain.engines.factory import check_engine, close_sampler, hf_sampler, make_labeller, make_sampler, preflight
from selftrain.stages.train import dpo_config, sft_config, train_generation, uses_dpo
from selftrain.stages.train_worker import launch

log = logging.getLogger(__name__)
MONITOR_STAGES = ("probe", "report", "screen", "guard")
# Run-control keys: they change how a command treats an existing folder, not the experiment,
# so they may differ between the run that started a folder and the one that resumes it
# (report_to only says where metrics are also sent: a tracker may be named on resume).
RUN_CONTROL = ("resume", "force_stage", "report_to")


class Generation:
    """One generation's folder, manifest and (lazily loaded) model."""

    def __init__(self, run_dir: Path, k: int, model_path: str, parent: str | None, cfg, on_stage=None):
        self.k, self.dir, self.model_path, self.cfg = k, gen_dir(run_dir, k), model_path, cfg
        self.manifest = Manifest(self.dir / MANIFEST, {"generation": k, "model": model_path, "parent": parent},
                                 root=run_dir)
        self._model = self._tok = None
        self.current: str | None = None  # the stage running now, for the interrupt message
        self.on_stage = on_stage  # told "gen-k/stage" before each stage that runs

    def model(self):
        if self._model is None:
            self._tok = models.load_tokenizer(self.model_path, self.cfg.model.trust_remote_code)
            self._model = models.load_model(self.model_path, self.cfg.model.dtype, self.cfg.model.trust_remote_code,
                                            self.cfg.model.allow_pickle, self.cfg.model.device)
        return self._model, self._tok

    def release(self) -> None:
        self._model = self._tok = None
        gc.collect()

    def todo(self, stage: str) -> bool:
        """Whether `stage` still has to run; a pending signal stops the run here, between stages."""
        if self.manifest.stage_done(stage):
            return False
        self.current = f"{self.dir.name}/{stage}"
        check_interrupt()
        if self.on_stage is not None:
            self.on_stage(self.current)
        return True


class LazySampler:
    """An HFSampler whose model loads on first use: a stage whose chunks were all committed
    by an earlier attempt loads nothing."""

    def __init__(self, factory):
        self.factory, self._sampler = factory, None

    def _get(self):
        if self._sampler is None:
            self._sampler = self.factory()
        return self._sampler

    def chat(self, conversations, params, desc="sampling"):
        return self._get().chat(conversations, params, desc=desc)

    def describe(self) -> dict:
        return self._sampler.describe() if self._sampler is not None else {"loaded": False}

    def option_logprobs(self, conversations, options):
        return self._get().option_logprobs(conversations, options)

    def close(self) -> None:
        close_sampler(self._sampler)

    def take_stats(self) -> dict:
        """Token counts and generate seconds since the last call (empty if nothing was sampled)."""
        take = getattr(self._sampler, "take_stats", None)
        return take() if take is not None else {}


def _params(cfg, max_new_tokens: int, seed: int) -> SamplingParams:
    s = cfg.sampler
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                          repetition_penalty=s.repetition_penalty, seed=seed)


def _sampler(cfg, gen: Generation):
    """The engine `sampler.backend` names; only hf loads generation k's weights into this process."""
    return make_sampler(cfg.sampler, gen.model, gen.model_path, cfg.model)


def _check_resume(path: Path, old_manifest: dict, config: dict) -> None:
    old = old_manifest.get("config")
    if old is None:
        return
    if not isinstance(old, dict):
        raise UserError(f"{path}: not a valid manifest ('config' is not an object)")
    old = {k: v for k, v in old.items() if k not in RUN_CONTROL}
    config = {k: v for k, v in config.items() if k not in RUN_CONTROL}
    if old == config:
        return
    changed, one_sided = config_diff([old, config])
    diff = changed + one_sided  # keys whose value changed first, then keys only one config has
    shown = ", ".join(diff[:10]) + (f" and {len(diff) - 10} more" if len(diff) > 10 else "")
    raise UserError(f"{path}: this run folder was started with a different config "
                    f"(differs in: {shown}); use a new run folder")


def run(cfg, run_dir: Path, group: str | None = None) -> dict:
    """Run (or resume) a whole self-training experiment in `run_dir`, holding the folder's lock
    throughout (a folder held by a live process is refused: lock.FolderLocked). Returns the run
    manifest; its last `attempts` entry says how this run started ("mode") and the first stage it
    ran ("from", None when nothing was left to do). `group` names the tracker group the run joins
    (a multirun's sweep folder; default: run_name)."""
    run_dir = Path(run_dir)
    validate(cfg)
    with RunLock(run_dir) as lock:
        return _run(cfg, run_dir, lock, group or cfg.run_name)


def _dashboard(run_dir: Path) -> None:
    """Rebuild index.html; a page that cannot be written must not stop a run."""
    try:
        write_dashboard(run_dir)
    except Exception:  # noqa: BLE001 - reported, and the run's own artifacts are unaffected
        log.warning("%s: the run dashboard (index.html) was not rebuilt", run_dir, exc_info=True)


def _run(cfg, run_dir: Path, lock: RunLock, group: str) -> dict:
    import datasets

    datasets.disable_progress_bars()  # one bar per stage is ours; datasets' save/map bars are noise
    check_engine(cfg.sampler)  # vllm installed, GPUs for tensor parallel: before any file is read
    if uses_dpo(cfg.train.method) and cfg.preferences.source == "dataset":
        load_user_preferences(cfg.preferences.path)  # a missing field fails here, before any model loads
    constitution = Constitution.load(cfg.constitution.path, cfg.constitution.context)
    prompts = load_prompts(cfg.prompts, cfg.seed)
    full_suite = load_suite(cfg.probes.suite)
    suite = full_suite.select(cfg.probes.dimensions, cfg.probes.max_items_per_dimension)
    check_power(suite, cfg.monitor, full_suite)  # a monitor that can never alert is refused before any model loads
    base = models.resolve(cfg.model.name_or_path)
    preflight(cfg.sampler, base)  # the server answers and serves gen-0, before any model loads
    sft_config(cfg.train, run_dir / "gen-000" / "train", cfg.seed)  # TRL's own checks, before any model loads
    if uses_dpo(cfg.train.method):
        dpo_config(cfg.train, run_dir / "gen-000" / "train", cfg.seed)
        if _labels(cfg) and cfg.preferences.labeller_base_url:  # the server answers and serves the labeller
            close_sampler(make_labeller(cfg.preferences, cfg.sampler, base))
        elif _labels(cfg) and cfg.preferences.source == "ai_feedback":  # its tokenizer must tell options apart
            labeller = models.resolve(cfg.preferences.labeller) if cfg.preferences.labeller else base
            option_first_tokens(models.load_tokenizer(labeller, cfg.model.trust_remote_code),
                                list(cfg.preferences.options))

    config = OmegaConf.to_container(cfg, resolve=True)
    # Everything up to start_over / apply_force only reads: a refused run changes nothing.
    target = None
    existed = (run_dir / MANIFEST).exists()
    if cfg.resume:
        if existed:
            _check_resume(run_dir / MANIFEST, read_manifest(run_dir / MANIFEST), config)
        target = force_target(run_dir, parse_force(cfg.force_stage, cfg.generations))
        verify_outputs(run_dir, skip=target)
        _check_committed_chunks(cfg, run_dir, prompts, target)
    models.check_weights_format(base, cfg.model.allow_pickle)
    tokenizer = models.load_tokenizer(base, cfg.model.trust_remote_code)
    models.check_no_control_tokens(
        tokenizer,
        [(f"prompt '{p.id}' ({p.source})", p.text) for p in prompts]
        + [(f"{constitution.path}: principle '{c.id}'", c.critique + c.revision) for c in constitution.principles]
        + [(f"{constitution.path}: few-shot transcript {i}", " ".join(m["content"] for m in ex.messages()))
           for i, ex in enumerate(constitution.exemplars)]
        + [(f"probe item '{it.id}'", it.prompt + it.aligned + it.misaligned + "".join(it.options))
           for it in suite.items])
    if not cfg.resume:
        start_over(run_dir)
        target = force_target(run_dir, parse_force(cfg.force_stage, cfg.generations))
    if target is not None:
        apply_force(run_dir, target)
    manifest = Manifest(run_dir / MANIFEST)
    attempt = {"started": now(), **{k: lock.record[k] for k in ("host", "pid", "slurm_job") if k in lock.record},
               "mode": ("restart" if not cfg.resume and existed else "force" if target is not None
                        else "resume" if existed else "new"), "from": None}
    if lock.took_over:
        manifest.data.setdefault("lock_takeovers", []).append(lock.took_over)

    def on_stage(where: str) -> None:
        if attempt["from"] is None:
            attempt["from"] = where
            manifest.save()

    old = manifest.data.get("tracker") or {}
    tracker = (old if old.get("report_to") == cfg.report_to and old.get("group") == group
               else trackers.tracking(cfg.report_to, run_dir, group))

    def track(gen: Generation, what: str) -> None:
        """Log generation k's drift metrics or stage timings to the tracker, once per generation."""
        done = gen.manifest.data.get("tracked", [])
        if tracker is None or what in done:
            return
        metrics = (trackers.generation_metrics if what == "drift" else trackers.timing_metrics)(run_dir, gen.k)
        trackers.log(tracker, gen.k, metrics)
        gen.manifest.update(tracked=done + [what])
        manifest.update(tracker=tracker)  # mlflow: the run id its first log created

    manifest.update(
        attempts=manifest.data.get("attempts", []) + [attempt],
        config=config, status="running", started=manifest.data.get("started", now()),
        constitution={"name": constitution.name, "kind": constitution.kind, "path": constitution.path,
                      "sha256": constitution.sha256, "principles": [p.id for p in constitution.principles],
                      "context": cfg.constitution.context,
                      **constitution.footprint(tokenizer, cfg.constitution.fewshot)},
        prompts={"count": len(prompts), "sha256": prompts_hash(prompts),
                 "by_source": {s.name: sum(p.source == s.name for p in prompts) for s in cfg.prompts.sources}},
        probe_suite={"name": suite.name, "version": suite.version, "sha256": suite.sha256,
                     "items": len(suite.items), "dimensions": list(suite.dimensions)},
        seeds={"seed": cfg.seed}, versions=package_versions(), base_model=base,
        **({"tracker": tracker} if tracker else {}))
    try:
        with graceful_interrupts():
            for k in range(cfg.generations + 1):
                model_path = base if k == 0 else str(gen_dir(run_dir, k) / "model")
                parent = None if k == 0 else (base if k == 1 else str(gen_dir(run_dir, k - 1) / "model"))
                if k > 0:
                    _require_trained(run_dir, k)
                gate = _generation(cfg, run_dir, Generation(run_dir, k, model_path, parent, cfg, on_stage),
                                   constitution, prompts, suite, full_suite.texts(), last=(k == cfg.generations),
                                   track=track, tracker=tracker)
                manifest.update(generations_done=k + 1)
                if gate:
                    manifest.update(status="gated", gate=gate, finished=now(),
                                    final_report=str(gen_dir(run_dir, k) / "drift" / "report.md"))
                    _dashboard(run_dir)
                    return manifest.data
    except BaseException as e:
        manifest.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                        error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        _dashboard(run_dir)
        raise
    manifest.update(status="done", finished=now(),
                    final_report=str(gen_dir(run_dir, cfg.generations) / "drift" / "report.md"))
    _dashboard(run_dir)
    return manifest.data


def _require_trained(run_dir: Path, k: int) -> None:
    """gen-k/model loads only if gen-(k-1)'s train stage, which writes it, is recorded done."""
    prev = read_manifest(gen_dir(run_dir, k - 1) / MANIFEST)
    if prev.get("stages", {}).get("train", {}).get("status") != "done":
        raise UserError(f"{gen_dir(run_dir, k) / 'model'}: gen-{k - 1:03d}/train, which writes it, is not "
                        "recorded done; a checkpoint it did not finish is never loaded")


def _lineage(run_dir: Path, k: int, model_path: str) -> dict:
    """The hashes that chain generation k to its parent: gen-k's model, the parent model, and
    the SFT data gen-k was trained on (both null for gen-000)."""
    if k == 0:
        digest = sha256_tree(Path(model_path)) if Path(model_path).exists() else None
        return {"model_sha256": digest, "parent_model_sha256": None, "data_sha256": None, "data": None}
    prev = read_manifest(gen_dir(run_dir, k - 1) / MANIFEST)
    stages = prev.get("stages", {})
    rel_model, rel_data = f"gen-{k:03d}/model", f"gen-{k - 1:03d}/data/sft"
    digest = stages.get("train", {}).get("outputs", {}).get(rel_model) or sha256_tree(Path(model_path))
    data_sha = stages.get("data", {}).get("outputs", {}).get(rel_data)
    screened = run_dir / f"gen-{k - 1:03d}" / "screen" / "data" / "sft"
    if screened.is_dir():  # monitor.screen=drop: training read the screen's filtered copy
        rel_data, data_sha = f"gen-{k - 1:03d}/screen/data/sft", sha256_tree(screened)
    return {"model_sha256": digest, "parent_model_sha256": prev.get("model_sha256"),
            "data_sha256": data_sha, "data": rel_data}


def _check_committed_chunks(cfg, run_dir: Path, prompts, target) -> None:
    """Read back every committed chunk a resume will use, before anything is written."""
    ids = [p.id for p in prompts]
    for k in range(cfg.generations):
        g = gen_dir(run_dir, k)
        if not (g / MANIFEST).is_file() or (target is not None and k > target[0]):
            continue
        stages = read_manifest(g / MANIFEST).get("stages", {})
        skip = set() if target is None or k < target[0] else {"sample", "critique"} if target[1] in (
            "probe", "report", "sample") else {"critique"} if target[1] == "critique" else set()
        if stages.get("sample", {}).get("status") != "done" and "sample" not in skip:
            check_chunks(g / ".chunks" / "sample", ids, cfg.sampler.chunk_size)
        elif (stages.get("critique", {}).get("status") != "done" and "critique" not in skip
              and (g / "samples.jsonl").is_file()):
            sample_ids = [r.get("prompt_id") for r in read_jsonl(g / "samples.jsonl")]
            check_chunks(g / ".chunks" / "critique", sample_ids, cfg.sampler.chunk_size)


def _generation(cfg, run_dir, gen: Generation, constitution, prompts, suite, probe_texts: list[str],
                last: bool, track, tracker: dict | None) -> dict | None:
    """Run generation k's stages; return the gate's record if the monitor stopped the loop.
    `track(gen, what)` logs its drift metrics ("drift") or stage timings ("timings") to the
    experiment tracker; `tracker` is where TRL's training logs go."""
    try:
        return _stages(cfg, run_dir, gen, constitution, prompts, suite, probe_texts, last, track, tracker)
    except Interrupted as e:
        e.where = gen.current
        raise


def _stages(cfg, run_dir, gen: Generation, constitution, prompts, suite, probe_texts: list[str],
            last: bool, track, tracker: dict | None) -> dict | None:
    m, k = gen.manifest, gen.k
    if "model_sha256" not in m.data:
        m.update(**_lineage(run_dir, k, gen.model_path))
    if "config_sha256" not in m.data:  # the inputs this generation ran under, for selftrain-lineage
        run_m = read_manifest(run_dir / MANIFEST)
        m.update(config_sha256=config_sha256(run_m["config"]), constitution_sha256=constitution.sha256,
                 probe_suite_sha256=suite.sha256)
    t0 = time.perf_counter()

    if gen.todo("probe"):
        with m.stage("probe", outputs=[gen.dir / "probes"], optional=[gen.dir / "monitor"]) as counts:
            model, tok = gen.model()
            counts.update(probe_model(model, tok, suite, cfg.probes, cfg.monitor, gen.dir,
                                      reference=None if k == 0 else gen_dir(run_dir, 0),
                                      seed=cfg.seed * 100 + k, batch_size=cfg.sampler.batch_size))
            counts["dimensions"] = len(suite.dimensions)
    if gen.todo("report"):
        with m.stage("report", outputs=[gen.dir / "drift"]) as counts:
            rep = generation_report(run_dir, k, monitor_settings(cfg.monitor))
            counts.update(alerts=sum(a["level"] == "alert" for a in rep["alerts"]),
                          watches=sum(a["level"] == "watch" for a in rep["alerts"]))
        _dashboard(run_dir)
    track(gen, "drift")  # before anything trains on this generation's data
    if cfg.monitor.gate and not last and k > 0:
        rep = read_json(gen.dir / "drift" / "report.json")
        fired = [a for a in rep["alerts"] if a["level"] == "alert" and a["comparison"] == "cumulative"]
        if fired:
            gate = {"stopped_before": f"gen-{k + 1:03d}", "at": f"gen-{k:03d}",
                    "reason": "cumulative alert: " + ", ".join(f"{a['dimension']} ({a['instrument']})"
                                                               for a in fired)}
            gen.release()
            m.update(status="gated", gate=gate)
            track(gen, "timings")
            log.warning("monitor gate: %s; stopping before %s", gate["reason"], gate["stopped_before"])
            return gate

    if not last:
        directions = _screen_directions(cfg, run_dir)  # the frozen gen-000 directions the screen reads
        sampler = LazySampler(lambda: _sampler(cfg, gen))
        chunks = gen.dir / ".chunks"
        if gen.todo("sample"):
            with m.stage("sample", outputs=[gen.dir / "samples.jsonl"]) as counts:
                recs = sample_stage(sampler, prompts, _params(cfg, cfg.sampler.max_new_tokens, cfg.seed * 100 + k),
                                    chunks / "sample", cfg.sampler.chunk_size, counts)
                write_jsonl(gen.dir / "samples.jsonl", recs)
                counts.update(prompts=len(recs), sampler=sampler.describe(), **sampler.take_stats())
        shutil.rmtree(chunks / "sample", ignore_errors=True)  # folded into samples.jsonl
        if _revisions_used(cfg) and gen.todo("critique"):
            with m.stage("critique", outputs=[gen.dir / "critiques.jsonl"]) as counts:
                recs = critique_stage(
                    sampler, constitution, read_jsonl(gen.dir / "samples.jsonl"), cfg.critique.rounds,
                    cfg.constitution.fewshot,
                    _params(cfg, cfg.critique.critique_max_new_tokens, cfg.seed * 100 + k + 1),
                    _params(cfg, cfg.critique.revision_max_new_tokens, cfg.seed * 100 + k + 2), seed=cfg.seed + k,
                    chunk_dir=chunks / "critique", chunk_size=cfg.sampler.chunk_size, counts=counts)
                write_jsonl(gen.dir / "critiques.jsonl", recs)
                usage: dict[str, int] = {}
                for r in recs:
                    for rd in r["rounds"]:
                        usage[rd["principle"]] = usage.get(rd["principle"], 0) + 1
                counts.update(records=len(recs), rounds=cfg.critique.rounds, principle_usage=usage,
                              sampler=sampler.describe(), **sampler.take_stats())
        shutil.rmtree(chunks, ignore_errors=True)
        close_sampler(sampler)
        if directions is None or m.stage_done("screen"):  # else the screen reads model k's states: keep it loaded
            gen.release()
        if _revisions_used(cfg) and gen.todo("data"):
            # with a label stage, data/preference is that stage's output (it replaces the revision pairs)
            data_out = [gen.dir / "data" / "sft"] + ([] if _labels(cfg) else [gen.dir / "data" / "preference"])
            with m.stage("data", outputs=data_out) as counts:
                counts.update(build_datasets(read_jsonl(gen.dir / "critiques.jsonl"), gen.dir / "data",
                                             cfg.data.min_words, cfg.data.max_top_trigram_share))
                if counts["kept"] == 0:
                    raise UserError(f"generation {k}: every revision was dropped ({counts}); "
                                    "raise critique.revision_max_new_tokens or check the model")
        if _labels(cfg) and gen.todo("label"):
            # the labelled pairs replace the data stage's revision pairs in data/preference
            with m.stage("label", outputs=[gen.dir / "data" / "preference"],
                         optional=[gen.dir / "preferences.jsonl"]) as counts:
                counts.update(_label(cfg, gen, constitution))
        if directions is not None and gen.todo("screen"):
            with m.stage("screen", outputs=[gen.dir / "screen"]) as counts:
                model, tok = gen.model()
                mc = cfg.monitor
                summary = screen_generation(model, tok, gen.dir, cfg.train.method, directions, mc.screen, mc.alpha,
                                            mc.screen_threshold, mc.screen_row_threshold, cfg.probes.batch_size)
                counts.update({k_: summary[k_] for k_ in ("rows", "rows_flagged", "rows_dropped", "flagged")})
                if summary["rows_dropped"] and summary["rows_dropped"] == summary["rows"]:
                    raise UserError(f"generation {k}: monitor.screen=drop removed every training row "
                                    f"(monitor.screen_row_threshold={mc.screen_row_threshold})")
        gen.release()
        if cfg.monitor.screen == "gate" and (gen.dir / "screen" / "screen.json").is_file():
            flagged = read_json(gen.dir / "screen" / "screen.json")["flagged"]
            if flagged:
                gate = {"stopped_before": f"gen-{k + 1:03d}", "at": f"gen-{k:03d}",
                        "reason": "data screen: training data moves " + ", ".join(flagged) +
                                  " toward the trait past monitor.screen_threshold"}
                m.update(status="gated", gate=gate)
                track(gen, "timings")
                log.warning("data screen gate: %s; stopping before training %s", gate["reason"],
                            gate["stopped_before"])
                return gate
        data_dir = train_data_dir(cfg, gen.dir)
        if gen.todo("guard"):
            with m.stage("guard") as counts:
                counts["texts_checked"] = guard.check(data_dir, probe_texts)
                counts["probe_texts"] = len(probe_texts)
        if gen.todo("train"):
            next_model = gen_dir(run_dir, k + 1) / "model"
            with m.stage("train", outputs=[next_model, gen.dir / "train" / "train_log.json"]) as counts:
                args = dict(method=cfg.train.method, parent=gen.model_path, data_dir=data_dir,
                            out_model=next_model, train_cfg=cfg.train, model_cfg=cfg.model, seed=cfg.seed + k,
                            work_dir=gen.dir / "train", tracking=trackers.for_training(tracker, k))
                # above one process, accelerate launch runs it as a subprocess: the driver stays single-process
                counts.update(train_generation(**args) if cfg.train.num_processes == 1 else
                              launch("train_generation", cfg.train.num_processes, cfg.train.accelerate_config,
                                     **args))
    gen.release()
    stages = m.data["stages"]
    total = sum(s.get("seconds", 0) for s in stages.values())
    monitor = sum(stages[s].get("seconds", 0) for s in MONITOR_STAGES if s in stages)
    m.update(status="done", wall_s=round(time.perf_counter() - t0, 3),
             monitor_s=round(monitor, 3), monitor_fraction=round(monitor / total, 4) if total else None)
    track(gen, "timings")
    return None


def _screen_directions(cfg, run_dir: Path) -> dict | None:
    """The frozen gen-000 directions the data screen reads; None when the screen is off or there
    are none (monitor.activations=false, which validate() refuses with screen=drop/gate)."""
    path = gen_dir(run_dir, 0) / "monitor" / "directions"
    if cfg.monitor.screen == "off" or not cfg.monitor.activations or not path.is_file():
        return None
    return load_directions(path) or None


def train_data_dir(cfg, gen_folder: Path) -> Path:
    """Where training reads generation k's data: the screen's filtered copy under screen=drop."""
    return gen_folder / "screen" / "data" if cfg.monitor.screen == "drop" else gen_folder / "data"


def _labels(cfg) -> bool:
    """The label stage runs when DPO trains on AI-feedback or user-supplied preferences."""
    return cfg.preferences.source in ("ai_feedback", "dataset") and uses_dpo(cfg.train.method)


def _revisions_used(cfg) -> bool:
    """Whether training reads the critique stage's revisions: SFT does, and DPO on revision pairs.
    DPO alone on labelled pairs does not, so its generations skip the critique and data stages
    (on the default experiment, critique was about half of a generation's time)."""
    return not (_labels(cfg) and cfg.train.method == "dpo")


def _label(cfg, gen: Generation, constitution) -> dict:
    """AI-feedback labels for generation k's prompts: model k samples, the labeller compares.
    With source=dataset, the user's pairs are copied into data/preference instead."""
    from datasets import Dataset

    from selftrain.stages.label import label_stage
    from selftrain.run.records import atomic_dir

    pref, k = cfg.preferences, gen.k
    if pref.source == "dataset":
        rows, digest = load_user_preferences(pref.path)
        with atomic_dir(gen.dir / "data" / "preference") as tmp:
            Dataset.from_list(rows).save_to_disk(str(tmp))
        return {"source": "dataset", "path": pref.path, "sha256": digest, "pairs": len(rows), "kept": len(rows)}
    sampler = _sampler(cfg, gen)  # the responses to compare come from the configured engine
    if pref.labeller_base_url:
        labeller = make_labeller(pref, cfg.sampler, gen.model_path)
        who = {"source": "preferences.labeller_base_url", **labeller.describe()}
    elif pref.labeller:
        path = models.resolve(pref.labeller)
        # an in-process labeller takes the hf sampler's settings, whatever sampler.backend is
        labeller = hf_sampler(cfg.sampler, models.load_model(path, cfg.model.dtype, cfg.model.trust_remote_code,
                                                             device=cfg.model.device),
                              models.load_tokenizer(path, cfg.model.trust_remote_code), pref.batch_size)
        who = {"source": "preferences.labeller", "path": path,
               "sha256": sha256_tree(Path(path)) if Path(path).exists() else None}
    else:
        labeller = hf_sampler(cfg.sampler, *gen.model(), batch_size=pref.batch_size)
        who = {"source": f"model k (gen-{k:03d})", "path": gen.model_path, "sha256": gen.manifest.data.get("model_sha256")}
    t0 = time.perf_counter()
    counts = label_stage(sampler, labeller, constitution, read_jsonl(gen.dir / "samples.jsonl"), pref,
                         _params(cfg, cfg.sampler.max_new_tokens, cfg.seed * 100 + k + 3),
                         _params(cfg, pref.cot_max_new_tokens, cfg.seed * 100 + k + 4), seed=cfg.seed + k,
                         gen_dir=gen.dir)
    if counts["kept"] == 0:
        raise UserError(f"generation {k}: every preference pair was dropped ({counts['dropped_identical']} identical, "
                        f"{counts['dropped_margin']} below preferences.min_margin={pref.min_margin})")
    close_sampler(sampler)
    close_sampler(labeller)
    gen.release()
    return {**counts, "sampler": sampler.describe(), "labeller": who, "seconds_labelling": round(time.perf_counter() - t0, 3)}
