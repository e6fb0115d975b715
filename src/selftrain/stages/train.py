"""Train generation k+1 on generation k's data: SFT (TRL SFTTrainer), DPO (TRL DPOTrainer), or both.

SFT and DPO take one path, `train_with`: read the dataset in memory, build TRL's config from
train.sft / train.dpo, load the tokenizer and model (LoRA through peft), train with the interrupt
and non-finite-loss callbacks, measure the weight change against the parent's safetensors and
save atomically. A `Recipe` holds what differs: TRL's trainer and config classes, the dataset's
columns, the defaults, and whether DPO's reference model is loaded.

`conf/train/*.yaml` uses TRL's own SFTConfig field names under `sft:` and DPOConfig names under
`dpo:`. DPO's reference model is generation k itself (iterative DPO): for full fine-tuning
selftrain loads it a second time and passes it as `ref_model` (TRL 1.16 would otherwise load a
copy from `model.config._name_or_path`, the same folder, but only when that is a path it can
read); with LoRA TRL uses the same model with the adapter disabled, which is generation k too.
`sft_dpo` runs SFT on data/sft, then DPO from the SFT model (the reference then is the SFT
model, as in the usual SFT-then-DPO recipe). Full fine-tuning, or
LoRA through peft merged back into the weights, so every generation is a plain safetensors
checkpoint. On CPU, bf16 and gradient checkpointing stay off: with them on, an SFT step is
several times slower (benchmarks/RESULTS.md).

Under `accelerate launch` with FSDP or DeepSpeed ZeRO-3 each rank holds a slice of the
weights. Saving then gathers them: `accelerator.get_state_dict` is a collective that every rank
calls; rank 0 alone loads the parent as a full model on CPU, copies the gathered weights into
it (merging LoRA there), computes the weight change and writes the generation. Rank 0 so holds
two copies of the weights in CPU memory, the gathered ones and the model they are copied into.

The weight change is measured against the parent's own safetensors files, read one tensor at a
time (`parent_weights`), not against a copy of the parent kept in memory through training.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from datasets import load_from_disk
from transformers import TrainerCallback

from selftrain import UserError

from selftrain.run import trackers
from selftrain.models import load_model, load_tokenizer
from selftrain.run.records import atomic_dir, check_disk, write_json
from selftrain.run.interrupts import check_interrupt, interrupt_requested

# Applied under the user's train.sft keys; the user's values win except where noted. report_to
# is the top-level key's (selftrain.run.trackers), never the user's train.sft one (schema refuses it).
# logging_nan_inf_filter off: transformers would log a NaN/inf step's loss as the mean of the finite
# ones (0.0 at logging_steps=1), and StopOnNonFinite, which reads the logged loss, would never fire.
SFT_DEFAULTS = dict(
    bf16=False, fp16=False, logging_steps=1, save_strategy="no",
    disable_tqdm=False, dataloader_num_workers=0, assistant_only_loss=False, logging_nan_inf_filter=False,
)
DPO_DEFAULTS = {k: v for k, v in SFT_DEFAULTS.items() if k != "assistant_only_loss"}


@dataclass(frozen=True)
class Recipe:
    """What SFT and DPO differ in. Everything else (loading, callbacks, the trainer's config, the
    weight change, the save) is `train_with`'s, the same for both."""

    section: str                # train.<section>: TRL's config field names
    config_class: str           # in trl; config/schema.check_trl_fields checks the keys against it
    trainer_class: str          # in trl
    columns: tuple[str, ...]    # the dataset's columns the trainer reads
    defaults: dict              # under the user's keys
    loss_name: str              # named when the loss turns non-finite ...
    advice: str                 # ... with the keys to lower
    reference: bool             # DPO: generation k again, frozen, as `ref_model` (full fine-tuning)


SFT = Recipe("sft", "SFTConfig", "SFTTrainer", ("messages",), SFT_DEFAULTS,
             "training loss", "train.sft.learning_rate", reference=False)
DPO = Recipe("dpo", "DPOConfig", "DPOTrainer", ("prompt", "chosen", "rejected"), DPO_DEFAULTS,
             "DPO loss", "train.dpo.learning_rate or train.dpo.beta", reference=True)


def _checkpointing_off(kwargs: dict, fields: set[str]) -> None:
    """TRL turns gradient checkpointing on by default; off unless the user asked for it.

    transformers 5.2x renamed it `activation_checkpointing` (the old name warns); older
    releases know only `gradient_checkpointing`.
    """
    wanted = kwargs.pop("activation_checkpointing", None)
    old = kwargs.pop("gradient_checkpointing", None)
    value = bool(wanted if wanted is not None else old if old is not None else False)
    kwargs["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = value


class StopOnNonFinite(TrainerCallback):
    """Stop training when the logged loss is NaN or infinite, remembering the step."""

    def __init__(self):
        self.bad_step: int | None = None

    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.bad_step = state.global_step
            control.should_training_stop = True
        return control


class StopOnInterrupt(TrainerCallback):
    """After SIGINT/SIGTERM, stop at the end of the current optimiser step; train_sft then raises
    before saving anything, so an interrupted train stage leaves no checkpoint and redoes training."""

    def on_step_end(self, args, state, control, **kw):
        if interrupt_requested():
            control.should_training_stop = True
        return control


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Disk a safetensors save of `model` needs: its parameter bytes (tied weights once) plus 10%
    for the tokenizer, config and the safetensors header."""
    return int(1.1 * sum(p.numel() * p.element_size() for p in model.parameters()))


def sft_config(train_cfg, output_dir: Path, seed: int, tracking: dict | None = None):
    return trainer_config(SFT, train_cfg, output_dir, seed, tracking)


def dpo_config(train_cfg, output_dir: Path, seed: int, tracking: dict | None = None):
    return trainer_config(DPO, train_cfg, output_dir, seed, tracking)


def trainer_config(recipe: Recipe, train_cfg, output_dir: Path, seed: int, tracking: dict | None = None):
    """TRL's own config dataclass from train.<section>, over selftrain's defaults; TRL's refusals
    become one line naming the section."""
    import dataclasses

    import trl
    from omegaconf import DictConfig, OmegaConf

    cls, prefix = getattr(trl, recipe.config_class), f"train.{recipe.section}"
    user = train_cfg[recipe.section]
    user = OmegaConf.to_container(user, resolve=True) if isinstance(user, DictConfig) else dict(user)
    kwargs = {**recipe.defaults, **user, "output_dir": str(output_dir), "seed": seed, **trackers.trl_args(tracking)}
    _checkpointing_off(kwargs, {f.name for f in dataclasses.fields(cls)})
    _precision_from_deepspeed(kwargs, user, prefix)
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
        kwargs["bf16"] = kwargs["fp16"] = False
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"{prefix}: {str(e).splitlines()[0]}") from e


def _precision_from_deepspeed(kwargs: dict, user: dict, prefix: str) -> None:
    """Under DeepSpeed, transformers refuses bf16/fp16 that differ from the accelerate config's
    `mixed_precision` (which `accelerate launch` passes as ACCELERATE_MIXED_PRECISION): follow it."""
    if not _launched_with("DEEPSPEED"):
        return
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    for key in ("bf16", "fp16"):
        if key in user and user[key] is not None and bool(user[key]) != (mixed == key):
            raise UserError(f"{prefix}.{key}={user[key]}: the DeepSpeed accelerate config sets "
                            f"mixed_precision: {mixed}; DeepSpeed needs the two to agree")
        kwargs[key] = mixed == key


def peft_config(lora):
    from peft import LoraConfig as PeftLora

    return PeftLora(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                    target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


def weight_change(before, after: torch.nn.Module | dict) -> dict:
    """Relative L2 change of all weights, and how many tensors changed at all. A tensor listed
    under two names (a tied output layer and input embedding) counts once. `before` is a dict of
    tensors or anything with its `get` (`_SavedWeights`)."""
    num = den = 0.0
    changed = 0
    seen: set[tuple] = set()
    for name, p in (after if isinstance(after, dict) else after.state_dict()).items():
        b = before.get(name)
        where = (p.device.type, p.data_ptr(), tuple(p.shape), p.stride())
        if b is None or where in seen:
            continue
        seen.add(where)
        d = p.detach().float() - b.to(p.device).float()  # the parent's copy stays on the CPU; p may not
        num += float(d.pow(2).sum())
        den += float(b.float().pow(2).sum())
        changed += int(bool(d.abs().max() > 0))
    return {"relative_l2": math.sqrt(num / max(den, 1e-30)), "tensors_changed": changed}


class _SavedWeights:
    """A checkpoint's weights by state-dict name, each read from its safetensors file when asked for
    (`weight_change` reads each once), so measuring a change costs one tensor of memory at a time."""

    def __init__(self, files: dict[str, Path]):
        self.files = files  # name -> file

    def get(self, name, default=None):
        from safetensors import safe_open

        if name not in self.files:
            return default
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def saved_weights(parent: str, model: torch.nn.Module) -> _SavedWeights | None:
    """The parent's saved tensors, read lazily, where its safetensors files name every weight of
    `model` (tied copies aside); None otherwise (no safetensors, other names)."""
    import json

    folder, files = Path(parent), {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {k: folder / f for k, f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].items()}
    elif (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            files = {k: folder / "model.safetensors" for k in f.keys()}
    if files and all(k in files or _tied(model, k) for k in model.state_dict()):
        return _SavedWeights(files)
    return None


def parent_weights(parent: str, model: torch.nn.Module) -> _SavedWeights | dict:
    """What a generation's weight change is measured against, with `model` the parent as loaded:
    its saved tensors (`saved_weights`), or else a copy of its weights, taken now, before they change."""
    saved = saved_weights(parent, model)
    return saved if saved is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}


class Trained(NamedTuple):
    """What `train_with` hands back: the counts both methods report, the weight change, TRL's
    config and its log (DPO reads its beta and reward columns)."""

    stats: dict
    change: dict
    args: object
    logs: list[dict]


def train_sft(parent: str, data_dir: Path, out_model: Path, train_cfg, model_cfg, seed: int,
              work_dir: Path, tracking: dict | None = None) -> dict:
    """Fine-tune `parent` on the SFT dataset; write the merged model to `out_model` atomically.
    `tracking` (selftrain.run.trackers.for_training) sends TRL's logs to the run's tracker."""
    run = train_with(SFT, parent, data_dir, out_model, train_cfg, model_cfg, seed, work_dir, tracking)
    return {**run.stats, **run.change}


def train_dpo(parent: str, data_dir: Path, out_model: Path, train_cfg, model_cfg, seed: int,
              work_dir: Path, tracking: dict | None = None) -> dict:
    """DPO of `parent` on a preference dataset, reference = `parent`; write the model atomically."""
    from selftrain.preferences import check_preference_dataset

    check_preference_dataset(data_dir)
    run = train_with(DPO, parent, data_dir, out_model, train_cfg, model_cfg, seed, work_dir, tracking)
    return {"method": "dpo", **run.stats, "reference": parent, "beta": run.args.beta,
            **dpo_summary(run.logs), **run.change}


def train_with(recipe: Recipe, parent: str, data_dir: Path, out_model: Path, train_cfg, model_cfg, seed: int,
               work_dir: Path, tracking: dict | None = None) -> Trained:
    """One training of `parent` with TRL's trainer for `recipe`, written to `out_model` atomically.

    A first SIGINT/SIGTERM stops after the current step and saves nothing; a non-finite loss
    stops training and saves nothing either."""
    from transformers import set_seed

    # In memory: TRL maps (tokenises) the dataset, and on a dataset read from disk datasets would
    # write its cache-*.arrow files into the data folder, changing the recorded output hash.
    dataset = load_from_disk(str(data_dir), keep_in_memory=True).select_columns(list(recipe.columns))
    args = trainer_config(recipe, train_cfg, work_dir, seed, tracking)
    os.environ.update(trackers.trl_environment(tracking))
    set_seed(seed)
    tokenizer, model, ref = load_for_training(recipe, parent, train_cfg.lora, model_cfg)
    before = None if sharding_requested() else parent_weights(parent, model)
    guard = StopOnNonFinite()
    trainer = _trainer(recipe, model, ref, args, dataset, tokenizer, train_cfg.lora, [guard, StopOnInterrupt()])
    trackers.point_trainer(trainer, tracking)
    check_strategy(trainer.accelerator)
    result = trainer.train()
    check_interrupt()
    if guard.bad_step is not None:
        raise UserError(f"{recipe.loss_name} became NaN or infinite at step {guard.bad_step}; lower {recipe.advice}")
    change = _save(trainer, before, tokenizer, out_model, train_cfg.lora, parent, model_cfg)
    logs = trainer.state.log_history
    write_json(work_dir / "train_log.json", logs)
    losses = [r["loss"] for r in logs if "loss" in r]
    stats = {"rows": len(dataset), "steps": trainer.state.global_step,
             "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
             "train_runtime_s": result.metrics.get("train_runtime"), "lora": bool(train_cfg.lora.enabled)}
    return Trained(stats, change, args, logs)


def load_for_training(recipe: Recipe, parent: str, lora, model_cfg):
    """The tokenizer (padding on the right, as training pads), the model in train mode, and DPO's
    reference: with full fine-tuning generation k loaded again; with LoRA None, since TRL then uses
    the model with its adapter disabled, which is generation k too."""
    tokenizer = load_tokenizer(parent, model_cfg.trust_remote_code)
    tokenizer.padding_side = "right"  # training pads on the right; sampling on the left
    model = load_model(parent, model_cfg.dtype, model_cfg.trust_remote_code, model_cfg.allow_pickle)
    model.train()
    ref = None
    if recipe.reference and not lora.enabled:
        ref = load_model(parent, model_cfg.dtype, model_cfg.trust_remote_code, model_cfg.allow_pickle)
    return tokenizer, model, ref


def _trainer(recipe: Recipe, model, ref, args, dataset, tokenizer, lora, callbacks):
    import trl

    extra = {"ref_model": ref} if recipe.reference else {}
    return getattr(trl, recipe.trainer_class)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config(lora) if lora.enabled else None, callbacks=callbacks, **extra)


def _launched_with(strategy: str) -> bool:
    """Whether `accelerate launch` asked this rank for FSDP or DEEPSPEED (it says so in the environment)."""
    return os.environ.get(f"ACCELERATE_USE_{strategy}", "").lower() == "true"


def sharding_requested() -> str | None:
    """The sharded strategy `accelerate launch` asked this rank for."""
    if _launched_with("FSDP"):
        return "fsdp"
    if _launched_with("DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "deepspeed_zero3"
    return None


def sharding(accelerator) -> str | None:
    """'fsdp' or 'deepspeed_zero3' when the ranks hold slices of the weights; None when each holds them all."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3):
        return "deepspeed_zero3"
    return None


def check_strategy(accelerator) -> None:
    """Refuse a sharded strategy that accelerate did not turn on. accelerate (1.15) enables FSDP and
    DeepSpeed only on accelerator devices: on CPU it would quietly run plain data parallel."""
    wanted = "deepspeed" if _launched_with("DEEPSPEED") else "fsdp" if _launched_with("FSDP") else None
    if wanted and accelerator.distributed_type.value.lower() != wanted:
        config = os.environ.get("SELFTRAIN_ACCELERATE_CONFIG", "")
        name = "DeepSpeed" if wanted == "deepspeed" else "FSDP"
        raise UserError(f"train.accelerate_config={config}: {name} needs GPUs; accelerate runs "
                        f"{accelerator.distributed_type.value} here instead (use "
                        "builtin:conf/accelerate/cpu_multiprocess.yaml on CPU)")


def _save(trainer, before: dict | None, tokenizer, out_model: Path, lora, parent: str, model_cfg) -> dict:
    """Merge LoRA if any, write the model atomically as safetensors; return the weight change."""
    if sharding(trainer.accelerator):
        return _save_gathered(trainer, tokenizer, out_model, lora, parent, model_cfg)
    trained = trainer.model
    if lora.enabled:
        trained = trained.merge_and_unload()
    trained.eval()
    change = weight_change(before, trained)
    _write(trained, tokenizer, out_model)
    return change


def _write(model, tokenizer, out_model: Path) -> None:
    out_model.parent.mkdir(parents=True, exist_ok=True)
    check_disk(out_model.parent, checkpoint_bytes(model), f"the checkpoint {out_model}")
    with atomic_dir(out_model) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(tmp)


def _save_gathered(trainer, tokenizer, out_model: Path, lora, parent: str, model_cfg) -> dict:
    """FSDP / ZeRO-3: gather the full weights (every rank), write them from rank 0 (see the module doc).

    Ranks other than 0 get a link to rank 0's folder at their own `out_model`, so that a next
    training function on every rank (sft_dpo's DPO) reads the same model."""
    import torch.distributed as dist

    acc = trainer.accelerator
    strategy = sharding(acc)
    target = [str(out_model)]
    dist.broadcast_object_list(target, src=0)
    # transformers' Trainer.save_model does the same: the engine under DeepSpeed, the model under FSDP.
    state = acc.get_state_dict(trainer.deepspeed if strategy == "deepspeed_zero3" else trainer.model)
    change = {}
    if acc.is_main_process:
        full = load_unsharded(parent, model_cfg)
        before = parent_weights(parent, full)
        if lora.enabled:
            from peft import get_peft_model

            full = get_peft_model(full, peft_config(lora))
        _load_gathered(full, state, strategy)
        if lora.enabled:
            full = full.merge_and_unload()
        del state
        full.eval()
        change = {**weight_change(before, full), "sharding": strategy}
        _write(full, tokenizer, out_model)
    acc.wait_for_everyone()
    if not acc.is_main_process and Path(target[0]) != Path(out_model):
        out_model.parent.mkdir(parents=True, exist_ok=True)
        out_model.symlink_to(Path(target[0]).resolve(), target_is_directory=True)
    return change


def _load_gathered(model: torch.nn.Module, state: dict, strategy: str) -> None:
    """Copy the gathered weights into `model`; every weight must be there, whole."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _tied(model, k)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise RuntimeError(f"{strategy}: the gathered state dict does not match the model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
    model.load_state_dict(state, strict=False)


def _tied(model, key: str) -> bool:
    """A tied weight (lm_head with the input embedding) may be gathered once, under the other name."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return any(key.endswith(k) for k in tied)


def load_unsharded(path: str, model_cfg) -> torch.nn.Module:
    """A model as one full copy on this process. Under ZeRO-3, transformers would partition it at
    load (a collective that only rank 0 runs here), so DeepSpeed's loading hook is off meanwhile."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        return load_model(path, model_cfg.dtype, model_cfg.trust_remote_code, model_cfg.allow_pickle)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def dpo_summary(logs: list[dict]) -> dict:
    """DPO's logged reward margins and accuracies (training steps only), first / last / mean."""
    out = {}
    for key, name in (("rewards/margins", "reward_margin"), ("rewards/accuracies", "reward_accuracy")):
        vals = [r[key] for r in logs if key in r]
        out[f"{name}_first"] = vals[0] if vals else None
        out[f"{name}_last"] = vals[-1] if vals else None
        out[f"{name}_mean"] = sum(vals) / len(vals) if vals else None
    return out


def train_sft_dpo(parent: str, data_dir: Path, out_model: Path, train_cfg, model_cfg, seed: int,
                  work_dir: Path, tracking: dict | None = None) -> dict:
    """SFT on data_dir/sft, then DPO from the SFT model on data_dir/preference (reference = the SFT model).

    The SFT model lives in work_dir/sft_model only until DPO has written `out_model`; DPO's log is
    work_dir/train_log.json, SFT's work_dir/sft/train_log.json."""
    import shutil

    from selftrain.preferences import check_preference_dataset

    check_preference_dataset(Path(data_dir) / "preference")  # before spending time on SFT
    sft_model = Path(work_dir) / "sft_model"
    # the two trainers each count steps from 0: TensorBoard gets a folder for each
    sft_tracking = ({**tracking, "train_log_dir": tracking["train_log_dir"] + "-sft"}
                    if tracking and tracking.get("train_log_dir") else tracking)
    sft = train_sft(parent, Path(data_dir) / "sft", sft_model, train_cfg, model_cfg, seed, Path(work_dir) / "sft",
                    sft_tracking)
    dpo = train_dpo(str(sft_model), Path(data_dir) / "preference", out_model, train_cfg, model_cfg, seed,
                    Path(work_dir), tracking)
    shutil.rmtree(sft_model, ignore_errors=True)
    if int(os.environ.get("RANK", "0")) != 0:  # the worker keeps rank 0's result only
        return {**dpo, "method": "sft_dpo", "sft": sft}
    trained = load_unsharded(str(out_model), model_cfg)
    start = saved_weights(parent, trained)  # the same names as the parent's, SFT and DPO change no names
    total = weight_change(start if start is not None else load_unsharded(parent, model_cfg).state_dict(), trained)
    return {**dpo, "method": "sft_dpo", "sft": sft, "dpo_relative_l2": dpo["relative_l2"], **total}


def train_generation(method: str, parent: str, data_dir: Path, out_model: Path, train_cfg, model_cfg, seed: int,
                     work_dir: Path, tracking: dict | None = None) -> dict:
    """train.method's training of generation k+1 from generation k's data folder (sft/, preference/)."""
    data_dir = Path(data_dir)
    if method == "sft":
        return train_sft(parent, data_dir / "sft", out_model, train_cfg, model_cfg, seed, work_dir, tracking)
    if method == "dpo":
        return train_dpo(parent, data_dir / "preference", out_model, train_cfg, model_cfg, seed, work_dir, tracking)
    return train_sft_dpo(parent, data_dir, out_model, train_cfg, model_cfg, seed, work_dir, tracking)


def uses_dpo(method: str) -> bool:
    return method in ("dpo", "sft_dpo")
