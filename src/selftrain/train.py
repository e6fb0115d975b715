"""Train generation k+1 on generation k's SFT data with TRL's SFTTrainer.

`conf/train/*.yaml` uses TRL's own SFTConfig field names under `sft:`. Full fine-tuning, or
LoRA through peft merged back into the weights, so every generation is a plain safetensors
checkpoint. On CPU, bf16 and gradient checkpointing stay off: with them on, one SFT step of
the 135M model measured about 8x slower on 2 cores (107 s against 13 s).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from datasets import load_from_disk
from transformers import TrainerCallback

from . import UserError
from .models import load_model, load_tokenizer
from .records import atomic_dir, check_disk, write_json
from .resume import check_interrupt, interrupt_requested

# Applied under the user's train.sft keys; the user's values win except where noted.
SFT_DEFAULTS = dict(
    bf16=False, fp16=False, logging_steps=1, save_strategy="no", report_to="none",
    disable_tqdm=False, dataloader_num_workers=0, assistant_only_loss=False,
)


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


def sft_config(train_cfg, output_dir: Path, seed: int):
    from trl import SFTConfig

    import dataclasses

    kwargs = {**SFT_DEFAULTS, **dict(train_cfg.sft), "output_dir": str(output_dir), "seed": seed}
    _checkpointing_off(kwargs, {f.name for f in dataclasses.fields(SFTConfig)})
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
        kwargs["bf16"] = kwargs["fp16"] = False
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"train.sft: {str(e).splitlines()[0]}") from e


def peft_config(lora):
    from peft import LoraConfig as PeftLora

    return PeftLora(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                    target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


def weight_change(before: dict, after: torch.nn.Module) -> dict:
    """Relative L2 change of all weights, and how many tensors changed at all."""
    num = den = 0.0
    changed = 0
    for name, p in after.state_dict().items():
        b = before.get(name)
        if b is None:
            continue
        d = (p.detach().float() - b.float())
        num += float(d.pow(2).sum())
        den += float(b.float().pow(2).sum())
        changed += int(bool(d.abs().max() > 0))
    return {"relative_l2": math.sqrt(num / max(den, 1e-30)), "tensors_changed": changed}


def train_sft(parent: str, data_dir: Path, out_model: Path, train_cfg, model_cfg, seed: int,
              work_dir: Path) -> dict:
    """Fine-tune `parent` on the SFT dataset; write the merged model to `out_model` atomically."""
    from transformers import set_seed
    from trl import SFTTrainer

    # In memory: TRL maps (tokenises) the dataset, and on a dataset read from disk datasets would
    # write its cache-*.arrow files into data/sft, changing the recorded output hash.
    dataset = load_from_disk(str(data_dir), keep_in_memory=True).select_columns(["messages"])
    args = sft_config(train_cfg, work_dir, seed)
    set_seed(seed)
    tokenizer = load_tokenizer(parent, model_cfg.trust_remote_code)
    tokenizer.padding_side = "right"  # training pads on the right; sampling on the left
    model = load_model(parent, model_cfg.dtype, model_cfg.trust_remote_code, model_cfg.allow_pickle)
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    guard = StopOnNonFinite()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config(train_cfg.lora) if train_cfg.lora.enabled else None,
                         callbacks=[guard, StopOnInterrupt()])
    result = trainer.train()
    check_interrupt()
    if guard.bad_step is not None:
        raise UserError(f"training loss became NaN or infinite at step {guard.bad_step}; "
                        "lower train.sft.learning_rate")
    trained = trainer.model
    if train_cfg.lora.enabled:
        trained = trained.merge_and_unload()
    trained.eval()
    change = weight_change(before, trained)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    check_disk(out_model.parent, checkpoint_bytes(trained), f"the checkpoint {out_model}")
    with atomic_dir(out_model) as tmp:
        trained.save_pretrained(tmp, safe_serialization=True)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(tmp)
    logs = trainer.state.log_history
    write_json(work_dir / "train_log.json", logs)
    losses = [r["loss"] for r in logs if "loss" in r]
    return {"rows": len(dataset), "steps": trainer.state.global_step,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "lora": bool(train_cfg.lora.enabled), **change}
