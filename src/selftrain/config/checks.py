"""Checks of a composed config beyond what its types say: ranges, names, TRL field names and the
machine's devices, each failing with one line naming the key, before any model loads.

The schema itself (every key, its default and its help) is config/schema.py; `validate()` here
is what `selftrain` runs on the composed config, and the `validate_*` helpers are shared with
`selftrain-drift` and `selftrain-validate`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict

from selftrain import UserError
from selftrain.config import schema as schema_module
from selftrain.config.schema import OPTIONS_RULES, PREFERENCE_SOURCES, SCREEN_MODES, TRAIN_METHODS, SelftrainConfig


_DTYPES = ("float32", "bfloat16", "float16")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def validate(cfg: Any) -> None:
    """Checks beyond types. Raises UserError naming the key and value at fault."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    _no_unknown_keys(cfg, SelftrainConfig)
    # both name folders (runs/<run_name>/..., <arm>-seed<k>-<n>): keep them plain names inside runs/
    for key, value in (("run_name", cfg.run_name), ("constitution.name", cfg.constitution.name)):
        need(bool(_NAME.fullmatch(str(value))),
             f"{key}={value}: use letters, digits, '.', '_' or '-' (it names a folder inside runs/)")
    need(cfg.generations >= 1, f"generations={cfg.generations}: must be at least 1")
    need(cfg.model.dtype in _DTYPES, f"model.dtype={cfg.model.dtype}: must be one of {', '.join(_DTYPES)}")
    from selftrain.models import inference_device
    inference_device(cfg.model.device)  # a device this machine lacks fails here, before any model loads
    validate_sampler(cfg.sampler, cfg.generations)
    need(cfg.sampler.batch_size >= 1, f"sampler.batch_size={cfg.sampler.batch_size}: must be at least 1")
    need(cfg.sampler.chunk_size >= 1, f"sampler.chunk_size={cfg.sampler.chunk_size}: must be at least 1")
    need(cfg.sampler.get("prefill_rows") is None or cfg.sampler.prefill_rows >= 1,
         f"sampler.prefill_rows={cfg.sampler.get('prefill_rows')}: must be at least 1 or null")
    need(cfg.sampler.max_batch_tokens is None or cfg.sampler.max_batch_tokens >= 1,
         f"sampler.max_batch_tokens={cfg.sampler.max_batch_tokens}: must be at least 1 or null")
    need(cfg.sampler.memory_budget_gib is None or cfg.sampler.memory_budget_gib > 0,
         f"sampler.memory_budget_gib={cfg.sampler.memory_budget_gib}: must be above 0 or null")
    need(cfg.sampler.temperature >= 0, f"sampler.temperature={cfg.sampler.temperature}: must be >= 0")
    need(0 < cfg.sampler.top_p <= 1, f"sampler.top_p={cfg.sampler.top_p}: must be in (0, 1]")
    for key in ("max_new_tokens",):
        need(getattr(cfg.sampler, key) >= 1, f"sampler.{key} must be at least 1")
    need(cfg.critique.rounds >= 1, f"critique.rounds={cfg.critique.rounds}: must be at least 1")
    need(cfg.constitution.fewshot >= 0, f"constitution.fewshot={cfg.constitution.fewshot}: must be >= 0")
    from selftrain.constitution import CONTEXTS
    need(cfg.constitution.context in CONTEXTS,
         f"constitution.context={cfg.constitution.context}: must be one of {', '.join(CONTEXTS)}")
    need(len(cfg.prompts.sources) > 0, "prompts.sources is empty: the prompt set needs at least one source")
    for i, src in enumerate(cfg.prompts.sources):
        need((src.path is None) != (src.hf is None),
             f"prompts.sources[{i}] ({src.name}): set exactly one of `path` and `hf`")
        need(src.n is None or src.n >= 1, f"prompts.sources[{i}].n={src.n}: must be at least 1 or null")
    need(cfg.train.method in TRAIN_METHODS,
         f"train.method={cfg.train.method}: must be one of {', '.join(TRAIN_METHODS)}")
    validate_preferences(cfg.preferences)
    need(cfg.train.num_processes >= 1, f"train.num_processes={cfg.train.num_processes}: must be at least 1")
    if cfg.train.num_processes > 1:
        from selftrain.stages.train_worker import check_accelerate_config
        check_accelerate_config(cfg.train.accelerate_config)
    validate_monitor(cfg.monitor)
    need(cfg.probes.max_items_per_dimension is None or cfg.probes.max_items_per_dimension >= 2,
         "probes.max_items_per_dimension must be at least 2 or null")
    check_trl_fields("train.sft", dict(cfg.train.sft), "SFTConfig")
    check_trl_fields("train.dpo", dict(cfg.train.dpo), "DPOConfig")
    from selftrain.run.trackers import check_tracker

    check_tracker(cfg.report_to)
    from selftrain.run.resume import parse_force

    parse_force(cfg.force_stage, cfg.generations)


def validate_preferences(p: Any) -> None:
    """Ranges of the preferences group; one UserError naming the key and value."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(p.source in PREFERENCE_SOURCES,
         f"preferences.source={p.source}: must be one of {', '.join(PREFERENCE_SOURCES)}")
    need(p.source != "dataset" or bool(p.path), "preferences.path: must be set when preferences.source=dataset")
    need(0 <= p.min_margin <= 1, f"preferences.min_margin={p.min_margin}: must be in [0, 1]")
    need(0 <= p.clamp_low <= 0.5 <= p.clamp_high <= 1,
         f"preferences.clamp_low={p.clamp_low}, clamp_high={p.clamp_high}: need 0 <= clamp_low <= 0.5 <= clamp_high <= 1")
    need(p.responses >= 2, f"preferences.responses={p.responses}: must be at least 2 (a pair)")
    need(p.principles >= 1, f"preferences.principles={p.principles}: must be at least 1")
    need(len(p.options) == 2 and all(isinstance(o, str) and o for o in p.options),
         f"preferences.options={list(p.options)}: must be two non-empty strings")
    need(p.cot_max_new_tokens >= 1, f"preferences.cot_max_new_tokens={p.cot_max_new_tokens}: must be at least 1")
    need(p.batch_size >= 1, f"preferences.batch_size={p.batch_size}: must be at least 1")
    need(p.labeller_base_url is None or str(p.labeller_base_url).startswith(("http://", "https://")),
         f"preferences.labeller_base_url={p.labeller_base_url}: must be an http(s):// URL")


_BACKENDS = ("hf", "openai", "vllm")
_PENALTY_AS = ("repetition_penalty", "frequency_penalty", "none")


def validate_sampler(s: Any, generations: int) -> None:
    """Sampler keys. What the machine offers (vllm installed, GPUs) is engines.factory.check_engine's."""
    if s.backend not in _BACKENDS:
        raise UserError(f"sampler.backend={s.backend}: must be one of {', '.join(_BACKENDS)}")
    if s.backend == "openai":
        if not s.base_url or not str(s.base_url).startswith(("http://", "https://")):
            raise UserError(f"sampler.base_url={s.base_url}: sampler=openai needs the server's http(s):// URL")
        if s.model is not None and generations > 1:
            raise UserError(f"sampler.model={s.model}: one served model cannot sample {generations} generations; "
                            "leave sampler.model null so each generation's checkpoint is requested")
        for key, low in (("max_concurrency", 1), ("retries", 0)):
            if getattr(s, key) < low:
                raise UserError(f"sampler.{key}={getattr(s, key)}: must be at least {low}")
        for key in ("timeout_s", "backoff_s"):
            if not getattr(s, key) > 0:
                raise UserError(f"sampler.{key}={getattr(s, key)}: must be > 0")
        if s.repetition_penalty_as not in _PENALTY_AS:
            raise UserError(f"sampler.repetition_penalty_as={s.repetition_penalty_as}: must be one of "
                            f"{', '.join(_PENALTY_AS)}")
    if s.backend == "vllm":
        if s.tensor_parallel_size < 1:
            raise UserError(f"sampler.tensor_parallel_size={s.tensor_parallel_size}: must be at least 1")
        if not 0 < s.gpu_memory_utilization <= 1:
            raise UserError(f"sampler.gpu_memory_utilization={s.gpu_memory_utilization}: must be in (0, 1]")
        if s.max_model_len is not None and s.max_model_len < 1:
            raise UserError(f"sampler.max_model_len={s.max_model_len}: must be at least 1 or null")


def _no_unknown_keys(cfg: Any, schema: type, prefix: str = "") -> None:
    """Hydra lets `+key=value` append keys the schema lacks; refuse them (Dict fields excepted)."""
    from omegaconf import DictConfig

    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys() if isinstance(cfg, DictConfig) else ():
        if key not in known:
            raise UserError(f"unknown config key: {prefix}{key}")
        sub = known[key].type
        sub = getattr(schema_module, sub, sub) if isinstance(sub, str) else sub
        if dataclasses.is_dataclass(sub):
            _no_unknown_keys(cfg[key], sub, f"{prefix}{key}.")


def validate_monitor(m: Any) -> None:
    """Ranges of the monitor group (shared by selftrain, selftrain-drift and selftrain-validate)."""
    if not 0 < m.alpha < 1:
        raise UserError(f"monitor.alpha={m.alpha}: must be in (0, 1)")
    for key in ("min_effect", "watch_effect", "activation_shift", "embedding_effect", "collapse_rel"):
        if getattr(m, key) < 0:
            raise UserError(f"monitor.{key}={getattr(m, key)}: must be >= 0")
    if m.options_rule not in OPTIONS_RULES:
        raise UserError(f"monitor.options_rule={m.options_rule}: must be one of {', '.join(OPTIONS_RULES)}")
    if m.cue_items < 1:
        raise UserError(f"monitor.cue_items={m.cue_items}: must be at least 1")
    if m.embedding_prompts < 4:
        raise UserError(f"monitor.embedding_prompts={m.embedding_prompts}: must be at least 4")
    if m.permutations < 50:
        raise UserError(f"monitor.permutations={m.permutations}: must be at least 50")
    if m.steer:
        alphas = list(m.steer_alphas)
        if not alphas or not all(math.isfinite(a) for a in alphas) or not any(a != 0 for a in alphas):
            raise UserError(f"monitor.steer_alphas={alphas}: give finite, non-zero steering strengths, "
                            "e.g. [-2,-1,1,2] (or set monitor.steer=false)")
    if m.screen not in SCREEN_MODES:
        raise UserError(f"monitor.screen={m.screen}: must be one of {', '.join(SCREEN_MODES)}")
    if m.screen in ("drop", "gate") and not m.activations:
        raise UserError(f"monitor.screen={m.screen}: the screen reads the frozen activation directions, "
                        "which monitor.activations=false turns off")
    for key in ("screen_threshold", "screen_row_threshold"):
        if not (math.isfinite(getattr(m, key)) and 0 < getattr(m, key) <= 10):
            raise UserError(f"monitor.{key}={getattr(m, key)}: must be in (0, 10] (gen-0 gap units)")


def check_trl_fields(prefix: str, fields: Dict[str, Any], config_class: str) -> None:
    """Refuse keys that are not fields of TRL's config class, before any model loads."""
    import trl

    cls = getattr(trl, config_class)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in fields:
        if key not in known:
            raise UserError(f"{prefix}.{key}: not a field of trl.{config_class}")
    if "output_dir" in fields:
        raise UserError(f"{prefix}.output_dir: set by selftrain (the run folder decides it)")
    for key in ("report_to", "run_name", "project"):
        if key in fields:
            raise UserError(f"{prefix}.{key}: set by selftrain; name the tracker with the top-level report_to")
