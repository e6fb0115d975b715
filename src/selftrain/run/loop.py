"""The self-training loop: generation k -> probe, report, sample, critique, data, label, screen, guard, train -> k+1.

Each stage writes under runs/<run>/gen-<k>/ (selftrain.run.layout) and is marked done in
gen-<k>/manifest.json only after its outputs are complete, so re-running the same command on the
same folder skips finished stages (and, inside sample and critique, committed chunks:
selftrain.run.resume). The stages follow one contract (selftrain.stages): `run_<stage>(gen, cfg, ...)`
does its own I/O and returns its counts; this module says which run, in what order, and records them.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from selftrain import UserError, models
from selftrain.analysis.dashboard import write_dashboard
from selftrain.analysis.drift_report import generation_report
from selftrain.config.checks import validate
from selftrain.config.schema import monitor_settings
from selftrain.constitution import Constitution
from selftrain.engines.base import option_first_tokens
from selftrain.engines.factory import check_engine, close_sampler, make_labeller, make_sampler, preflight
from selftrain.monitor.activations import load_directions
from selftrain.monitor.probe import check_power, probe_model
from selftrain.monitor.suites import load_suite
from selftrain.preferences import load_user_preferences
from selftrain.prompts import load_prompts, prompts_hash
from selftrain.run import seeds, trackers
from selftrain.run.layout import GenDir, RunDir
from selftrain.run.lineage import config_sha256
from selftrain.run.lock import RunLock
from selftrain.run.chunks import check_chunks
from selftrain.run.interrupts import Interrupted, check_interrupt, graceful_interrupts
from selftrain.run.records import (Manifest, config_diff, now, package_versions, read_json, read_jsonl,
                                   read_manifest, sha256_tree)
from selftrain.run.resume import apply_force, force_target, parse_force, start_over, verify_outputs
from selftrain.stages import critique, data, guard, label, labels, revisions_used, sample, screen, train_worker
from selftrain.stages.train import dpo_config, sft_config, uses_dpo

log = logging.getLogger(__name__)
MONITOR_STAGES = ("probe", "report", "screen", "guard")
# Run-control keys: they change how a command treats an existing folder, not the experiment,
# so they may differ between the run that started a folder and the one that resumes it
# (report_to only says where metrics are also sent: a tracker may be named on resume).
RUN_CONTROL = ("resume", "force_stage", "report_to")


class Generation:
    """One generation's folder (`layout`, a GenDir), manifest and (lazily loaded) model."""

    def __init__(self, run_dir: Path, k: int, model_path: str, parent: str | None, cfg, on_stage=None):
        self.layout = GenDir(run_dir, k)
        self.k, self.dir, self.model_path, self.cfg = k, self.layout.path, model_path, cfg
        self.manifest = Manifest(self.layout.manifest, {"generation": k, "model": model_path, "parent": parent},
                                 root=run_dir)
        self._model = self._tok = None
        self.current: str | None = None  # the stage running now, for the interrupt message
        self.on_stage = on_stage  # told "gen-k/stage" before each stage that runs

    @property
    def model_sha256(self) -> str | None:
        return self.manifest.data.get("model_sha256")

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

    def run(self, stage: str, work: Callable[[], dict], outputs=(), optional=()) -> None:
        """Run `stage` (work() returns its counts) inside its manifest entry, if it is not done yet."""
        if self.todo(stage):
            with self.manifest.stage(stage, outputs=outputs, optional=optional) as counts:
                counts.update(work())


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


@dataclass
class Inputs:
    """What every generation reads besides its own folder, and where its metrics go.
    `track(gen, what)` logs its drift metrics ("drift") or stage timings ("timings") to the
    experiment tracker; `tracker` is where TRL's training logs go."""
    constitution: Constitution
    prompts: list
    suite: object  # the selected probe suite
    probe_texts: list[str]  # every text of the full suite: the guard keeps them out of training
    track: Callable
    tracker: dict | None


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


# --------------------------------------------------------------------------- a run


def _run(cfg, run_dir: Path, lock: RunLock, group: str) -> dict:
    """run() under the folder's lock: check everything that can be checked read-only, then set the
    folder up (start over, force a stage, or resume), record the run's inputs and run the generations."""
    import datasets

    datasets.disable_progress_bars()  # one bar per stage is ours; datasets' save/map bars are noise
    constitution, prompts, full_suite, suite, base = _preflight(cfg, run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    # Everything up to start_over / apply_force only reads: a refused run changes nothing.
    target = None
    existed = RunDir(run_dir).manifest.exists()
    if cfg.resume:
        if existed:
            _check_resume(RunDir(run_dir).manifest, read_manifest(RunDir(run_dir).manifest), config)
        target = force_target(run_dir, parse_force(cfg.force_stage, cfg.generations))
        verify_outputs(run_dir, skip=target)
        _check_committed_chunks(cfg, run_dir, prompts, target)
    models.check_weights_format(base, cfg.model.allow_pickle)
    tokenizer = models.load_tokenizer(base, cfg.model.trust_remote_code)
    _check_texts(tokenizer, constitution, prompts, suite)
    if not cfg.resume:
        start_over(run_dir)
        target = force_target(run_dir, parse_force(cfg.force_stage, cfg.generations))
    if target is not None:
        apply_force(run_dir, target)
    manifest = Manifest(RunDir(run_dir).manifest)
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
    inputs = Inputs(constitution, prompts, suite, full_suite.texts(), track, tracker)
    return _generations(cfg, run_dir, manifest, base, inputs, on_stage)


def _preflight(cfg, run_dir: Path):
    """Read the run's inputs and refuse, before any model loads, what would fail later.
    Returns (constitution, prompts, full probe suite, selected suite, base model)."""
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
    work = GenDir(run_dir, 0).train
    sft_config(cfg.train, work, cfg.seed)  # TRL's own checks, before any model loads
    if uses_dpo(cfg.train.method):
        dpo_config(cfg.train, work, cfg.seed)
        if labels(cfg) and cfg.preferences.labeller_base_url:  # the server answers and serves the labeller
            close_sampler(make_labeller(cfg.preferences, cfg.sampler, base))
        elif labels(cfg) and cfg.preferences.source == "ai_feedback":  # its tokenizer must tell options apart
            labeller = models.resolve(cfg.preferences.labeller) if cfg.preferences.labeller else base
            option_first_tokens(models.load_tokenizer(labeller, cfg.model.trust_remote_code),
                                list(cfg.preferences.options))
    return constitution, prompts, full_suite, suite, base


def _check_texts(tokenizer, constitution: Constitution, prompts, suite) -> None:
    """No text the model will read may hold the tokenizer's control tokens."""
    models.check_no_control_tokens(
        tokenizer,
        [(f"prompt '{p.id}' ({p.source})", p.text) for p in prompts]
        + [(f"{constitution.path}: principle '{c.id}'", c.critique + c.revision) for c in constitution.principles]
        + [(f"{constitution.path}: few-shot transcript {i}", " ".join(m["content"] for m in ex.messages()))
           for i, ex in enumerate(constitution.exemplars)]
        + [(f"probe item '{it.id}'", it.prompt + it.aligned + it.misaligned + "".join(it.options))
           for it in suite.items])


def _generations(cfg, run_dir: Path, manifest: Manifest, base: str, inputs: Inputs, on_stage) -> dict:
    """Run gen-000..gen-G in turn, recording in the run manifest how the run ended."""
    try:
        with graceful_interrupts():
            for k in range(cfg.generations + 1):
                gen_k = GenDir(run_dir, k)
                model_path = base if k == 0 else str(gen_k.model)
                parent = None if k == 0 else (base if k == 1 else str(gen_k.parent().model))
                if k > 0:
                    _require_trained(run_dir, k)
                gate = _generation(cfg, run_dir, Generation(run_dir, k, model_path, parent, cfg, on_stage),
                                   inputs, last=(k == cfg.generations))
                manifest.update(generations_done=k + 1)
                if gate:
                    manifest.update(status="gated", gate=gate, finished=now(), final_report=str(gen_k.report_md))
                    _dashboard(run_dir)
                    return manifest.data
    except BaseException as e:
        manifest.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                        error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        _dashboard(run_dir)
        raise
    manifest.update(status="done", finished=now(), final_report=str(GenDir(run_dir, cfg.generations).report_md))
    _dashboard(run_dir)
    return manifest.data


def _require_trained(run_dir: Path, k: int) -> None:
    """gen-k/model loads only if gen-(k-1)'s train stage, which writes it, is recorded done."""
    prev = GenDir(run_dir, k - 1)
    if read_manifest(prev.manifest).get("stages", {}).get("train", {}).get("status") != "done":
        raise UserError(f"{prev.child_model}: {prev.name}/train, which writes it, is not "
                        "recorded done; a checkpoint it did not finish is never loaded")


def _lineage(run_dir: Path, k: int, model_path: str) -> dict:
    """The hashes that chain generation k to its parent: gen-k's model, the parent model, and
    the SFT data gen-k was trained on (both null for gen-000)."""
    if k == 0:
        digest = sha256_tree(Path(model_path)) if Path(model_path).exists() else None
        return {"model_sha256": digest, "parent_model_sha256": None, "data_sha256": None, "data": None}
    prev = GenDir(run_dir, k - 1)
    man = read_manifest(prev.manifest)
    stages = man.get("stages", {})
    rel_model, rel_data = prev.rel(prev.child_model), prev.rel(prev.sft)
    digest = stages.get("train", {}).get("outputs", {}).get(rel_model) or sha256_tree(Path(model_path))
    data_sha = stages.get("data", {}).get("outputs", {}).get(rel_data)
    screened = prev.screen_data / prev.sft.name
    if screened.is_dir():  # monitor.screen=drop: training read the screen's filtered copy
        rel_data, data_sha = prev.rel(screened), sha256_tree(screened)
    return {"model_sha256": digest, "parent_model_sha256": man.get("model_sha256"),
            "data_sha256": data_sha, "data": rel_data}


def _check_committed_chunks(cfg, run_dir: Path, prompts, target) -> None:
    """Read back every committed chunk a resume will use, before anything is written."""
    ids = [p.id for p in prompts]
    for k in range(cfg.generations):
        g = GenDir(run_dir, k)
        if not g.manifest.is_file() or (target is not None and k > target[0]):
            continue
        stages = read_manifest(g.manifest).get("stages", {})
        skip = set() if target is None or k < target[0] else {"sample", "critique"} if target[1] in (
            "probe", "report", "sample") else {"critique"} if target[1] == "critique" else set()
        if stages.get("sample", {}).get("status") != "done" and "sample" not in skip:
            check_chunks(g.chunk_dir("sample"), ids, cfg.sampler.chunk_size)
        elif (stages.get("critique", {}).get("status") != "done" and "critique" not in skip
              and g.samples.is_file()):
            sample_ids = [r.get("prompt_id") for r in read_jsonl(g.samples)]
            check_chunks(g.chunk_dir("critique"), sample_ids, cfg.sampler.chunk_size)


# --------------------------------------------------------------------------- a generation


def _generation(cfg, run_dir: Path, gen: Generation, inputs: Inputs, last: bool) -> dict | None:
    """Run generation k's stages; return the gate's record if the monitor stopped the loop."""
    try:
        _record_inputs(run_dir, gen, inputs)
        t0 = time.perf_counter()
        gate = _monitor(cfg, run_dir, gen, inputs, last)
        if gate is None and not last:
            gate = _make_data(cfg, run_dir, gen, inputs) or _train(cfg, gen, inputs)
        if gate is not None:
            return gate
        _finish(gen, inputs, t0)
        return None
    except Interrupted as e:
        e.where = gen.current
        raise


def _record_inputs(run_dir: Path, gen: Generation, inputs: Inputs) -> None:
    """The hashes of what generation k runs under, for selftrain-lineage (once per generation)."""
    m = gen.manifest
    if "model_sha256" not in m.data:
        m.update(**_lineage(run_dir, gen.k, gen.model_path))
    if "config_sha256" not in m.data:
        run_m = read_manifest(RunDir(run_dir).manifest)
        m.update(config_sha256=config_sha256(run_m["config"]), constitution_sha256=inputs.constitution.sha256,
                 probe_suite_sha256=inputs.suite.sha256)


def _monitor(cfg, run_dir: Path, gen: Generation, inputs: Inputs, last: bool) -> dict | None:
    """Probe model k and write its drift report, before anything trains on its data; under
    monitor.gate, a cumulative alert stops the loop here (returns the gate)."""
    g, k = gen.layout, gen.k

    def probe() -> dict:
        model, tok = gen.model()
        counts = probe_model(model, tok, inputs.suite, cfg.probes, cfg.monitor, g.path,
                             reference=None if k == 0 else g.first.path,
                             seed=seeds.probe(cfg.seed, k), batch_size=cfg.sampler.batch_size)
        return {**counts, "dimensions": len(inputs.suite.dimensions)}

    def report() -> dict:
        rep = generation_report(run_dir, k, monitor_settings(cfg.monitor))
        return {"alerts": sum(a["level"] == "alert" for a in rep["alerts"]),
                "watches": sum(a["level"] == "watch" for a in rep["alerts"])}

    gen.run("probe", probe, outputs=[g.probes], optional=[g.monitor])
    if gen.todo("report"):
        with gen.manifest.stage("report", outputs=[g.drift]) as counts:
            counts.update(report())
        _dashboard(run_dir)
    inputs.track(gen, "drift")  # before anything trains on this generation's data
    if cfg.monitor.gate and not last and k > 0:
        fired = [a for a in read_json(g.report_json)["alerts"]
                 if a["level"] == "alert" and a["comparison"] == "cumulative"]
        if fired:
            gen.release()
            reason = "cumulative alert: " + ", ".join(f"{a['dimension']} ({a['instrument']})" for a in fired)
            return _stop(gen, inputs, reason, "monitor gate: %s; stopping before %s")
    return None


def _stop(gen: Generation, inputs: Inputs, reason: str, message: str) -> dict:
    """Record a gate in generation k's manifest; the loop stops before generation k+1."""
    g = gen.layout
    gate = {"stopped_before": g.child().name, "at": g.name, "reason": reason}
    gen.manifest.update(status="gated", gate=gate)
    inputs.track(gen, "timings")
    log.warning(message, gate["reason"], gate["stopped_before"])
    return gate


def _make_data(cfg, run_dir: Path, gen: Generation, inputs: Inputs) -> dict | None:
    """sample, critique, data, label, screen: generation k's training data. Returns the screen's
    gate (monitor.screen=gate) if it stops the loop."""
    g = gen.layout
    directions = _screen_directions(cfg, run_dir)  # the frozen gen-000 directions the screen reads
    sampler = LazySampler(lambda: _sampler(cfg, gen))
    gen.run("sample", lambda: sample.run_sample(g, cfg, sampler, inputs.prompts), outputs=[g.samples])
    shutil.rmtree(g.chunk_dir("sample"), ignore_errors=True)  # folded into samples.jsonl
    if revisions_used(cfg):
        gen.run("critique", lambda: critique.run_critique(g, cfg, sampler, inputs.constitution),
                outputs=critique.outputs(g, cfg))
    shutil.rmtree(g.chunks, ignore_errors=True)
    close_sampler(sampler)
    if directions is None or gen.manifest.stage_done("screen"):  # else the screen reads model k's states: keep it
        gen.release()
    if revisions_used(cfg):
        gen.run("data", lambda: data.run_data(g, cfg), outputs=data.outputs(g, cfg))
    if labels(cfg):
        gen.run("label", lambda: label.run_label(g, cfg, inputs.constitution, gen),
                outputs=label.outputs(g, cfg), optional=label.optional_outputs(g, cfg))
    if directions is not None:
        gen.run("screen", lambda: screen.run_screen(g, cfg, *gen.model(), directions),
                outputs=screen.outputs(g, cfg))
    gen.release()
    reason = screen.gate_reason(g, cfg)
    if reason:
        return _stop(gen, inputs, reason, "data screen gate: %s; stopping before training %s")
    return None


def _train(cfg, gen: Generation, inputs: Inputs) -> None:
    """guard, train: generation k+1's weights from generation k's data."""
    g = gen.layout
    gen.run("guard", lambda: guard.run_guard(g, cfg, inputs.probe_texts))
    gen.run("train", lambda: train_worker.run_train(g, cfg, gen.model_path, inputs.tracker),
            outputs=[g.child_model, g.train_log])


def _finish(gen: Generation, inputs: Inputs, t0: float) -> None:
    """Mark generation k done, with its wall time and the monitor's share of it."""
    gen.release()
    m = gen.manifest
    stages = m.data["stages"]
    total = sum(s.get("seconds", 0) for s in stages.values())
    monitor = sum(stages[s].get("seconds", 0) for s in MONITOR_STAGES if s in stages)
    m.update(status="done", wall_s=round(time.perf_counter() - t0, 3),
             monitor_s=round(monitor, 3), monitor_fraction=round(monitor / total, 4) if total else None)
    inputs.track(gen, "timings")


def _screen_directions(cfg, run_dir: Path) -> dict | None:
    """The frozen gen-000 directions the data screen reads; None when the screen is off or there
    are none (monitor.activations=false, which validate() refuses with screen=drop/gate)."""
    path = GenDir(run_dir, 0).directions
    if cfg.monitor.screen == "off" or not cfg.monitor.activations or not path.is_file():
        return None
    return load_directions(path) or None
