"""SFT: the pipeline's `train_sft` against a bare TRL SFTTrainer call with the same data and
settings, and padding-free SFT as an ablation. Tokens/s counts the non-padding tokens of the
rows (chat template applied, truncated at max_length) times epochs."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from datasets import Dataset
from omegaconf import OmegaConf

from selftrain.config.schema import ModelConfig, TrainConfig
from selftrain.stages.train import train_sft

from .common import interleave, median, rate, ratio

HELDOUT = Path(__file__).resolve().parents[1] / "src" / "selftrain" / "monitor" / "heldout.txt"


def dataset(prompts, rows: int) -> Dataset:
    """Rows of {messages}: a shipped prompt and a human-written paragraph as the reply."""
    paras = [p.strip() for p in HELDOUT.read_text().split("\n\n") if p.strip()]
    msgs = [[{"role": "user", "content": prompts[i % len(prompts)].text},
             {"role": "assistant", "content": paras[i % len(paras)]}] for i in range(rows)]
    return Dataset.from_dict({"messages": msgs})


def _tokens(tok, ds: Dataset, max_length: int) -> int:
    return sum(min(len(tok.apply_chat_template(m, tokenize=True, return_dict=False)), max_length)
               for m in ds["messages"])


def _settings(sizes, seed: int) -> dict:
    # conf/train/sft.yaml with the benchmark's sizes: one epoch, constant LR
    return dict(learning_rate=2e-5, num_train_epochs=1, per_device_train_batch_size=sizes.sft_batch,
                gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0,
                max_length=sizes.sft_max_length, bf16=False, logging_steps=1)


def pipeline_arm(path, data_dir: Path, work: Path, sizes, extra: dict | None = None) -> dict:
    # the pipeline's own typed configs, so every field the train stage reads has its default
    train_cfg = OmegaConf.structured(TrainConfig(sft={**_settings(sizes, 0), **(extra or {})}))
    model_cfg = OmegaConf.structured(ModelConfig())
    t0 = time.perf_counter()
    r = train_sft(path, data_dir, work / "model", train_cfg, model_cfg, seed=0, work_dir=work / "train")
    wall = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    return {"train_runtime_s": r["train_runtime_s"], "wall_s": wall, "steps": r["steps"],
            "first_loss": r["first_loss"], "last_loss": r["last_loss"]}


def bare_arm(path, ds: Dataset, work: Path, sizes) -> dict:
    """SFTTrainer as its documentation shows it, with the same settings spelled out (bf16 and
    activation checkpointing off, as the pipeline runs on CPU)."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    t0 = time.perf_counter()
    set_seed(0)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = SFTConfig(output_dir=str(work), seed=0, save_strategy="no", report_to="none", use_cpu=True,
                     **{ckpt: False}, **_settings(sizes, 0))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    res = trainer.train()
    wall = time.perf_counter() - t0
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    shutil.rmtree(work, ignore_errors=True)
    return {"train_runtime_s": res.metrics["train_runtime"], "wall_s": wall, "steps": trainer.state.global_step,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def run(path, tok, prompts, sizes, ablations: bool = True) -> dict:
    ds = dataset(prompts, sizes.sft_rows)
    tokens = _tokens(tok, ds, sizes.sft_max_length)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    ds.save_to_disk(str(tmp / "data"))
    arms = {"pipeline": lambda: pipeline_arm(path, tmp / "data", tmp / "p", sizes),
            "bare_sfttrainer": lambda: bare_arm(path, ds, tmp / "b", sizes)}
    if ablations:
        # TRL enforces max_length only with padding; the rows here are shorter than it, so None is the same data
        arms["pipeline_padding_free"] = lambda: pipeline_arm(path, tmp / "data", tmp / "f", sizes,
                                                             {"padding_free": True, "max_length": None})
        arms["pipeline_packing"] = lambda: pipeline_arm(path, tmp / "data", tmp / "k", sizes, {"packing": True})
    try:
        # warm-up on one batch (lazy imports, first allocations), so the first arm timed does not pay for it
        ds.select(range(min(sizes.sft_batch, len(ds)))).save_to_disk(str(tmp / "warm"))
        pipeline_arm(path, tmp / "warm", tmp / "w", sizes)
        runs, errors = interleave(arms, sizes.repeats, required=("pipeline", "bare_sfttrainer"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {}
    for name, rs in runs.items():
        if not rs:
            continue
        res[name] = {"tokens_per_s": median([rate(tokens, r["train_runtime_s"]) for r in rs]),
                     "wall_tokens_per_s": median([rate(tokens, r["wall_s"]) for r in rs]),
                     "train_runtime_s": median([round(r["train_runtime_s"], 3) for r in rs]),
                     "wall_s": median([round(r["wall_s"], 3) for r in rs]), "steps": rs[0]["steps"],
                     "first_loss": rs[0]["first_loss"], "last_loss": rs[0]["last_loss"], "runs": len(rs)}
    for k, e in errors.items():
        res[k] = {"error": e}
    for k in ("pipeline_padding_free", "pipeline_packing"):
        if "tokens_per_s" in res.get(k, {}):
            res[k]["vs_pipeline"] = ratio(res[k]["tokens_per_s"], res["pipeline"]["tokens_per_s"])
    if "first_loss" in res.get("pipeline_padding_free", {}):
        # the same first batch: equal losses mean the flattened rows did not attend across each other
        a, b = res["pipeline_padding_free"]["first_loss"], res["pipeline"]["first_loss"]
        res["pipeline_padding_free"]["first_loss_matches_padded"] = (a is not None and b is not None
                                                                     and abs(a - b) <= 1e-3 * max(1.0, abs(b)))
    return {"settings": {"rows": sizes.sft_rows, "tokens": tokens, **_settings(sizes, 0), "repeats": sizes.repeats},
            "arms": res,
            "pipeline_vs_bare": ratio(res["pipeline"]["tokens_per_s"], res["bare_sfttrainer"]["tokens_per_s"]),
            "pipeline_vs_bare_wall": ratio(res["pipeline"]["wall_tokens_per_s"],
                                           res["bare_sfttrainer"]["wall_tokens_per_s"])}
