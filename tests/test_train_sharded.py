"""The train stage under FSDP2 and DeepSpeed ZeRO-3: 2 gloo processes on CPU, the tiny model.

Each rank holds a slice of the weights; the save gathers them and rank 0 writes the next
generation. accelerate runs these strategies only on GPUs, so the ranks here load the shim in
tests/sharded_on_cpu/ (see its docstring: it changes accelerate's device check, nothing else).
FSDP2 and ZeRO-3 average the gradients of the same global batch as data parallel does, so the
gathered generation must equal the data-parallel one to float rounding: that is what a correct,
complete gather gives, and a rank's slice or an empty placeholder would not.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose, write_sft_data
from selftrain import UserError
from selftrain.stages.train_worker import check_accelerate_config, launch

SHIM = ROOT / "tests" / "sharded_on_cpu"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
STRATEGIES = ["fsdp", pytest.param("deepspeed_zero3", marks=pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'selftrain[deepspeed]')"))]


@pytest.fixture
def sharded_on_cpu(monkeypatch):
    monkeypatch.setenv("SELFTRAIN_TEST_SHARDED_ON_CPU", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SHIM), *filter(None, [os.environ.get("PYTHONPATH")])]))


def _data(folder: Path) -> Path:
    from datasets import Dataset

    write_sft_data(folder / "sft", 8)
    rows = [{"prompt_id": str(i), "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"A careful, honest answer number {i}."}],
             "rejected": [{"role": "assistant", "content": f"No. Go away {i}."}], "label": 0.7, "margin": 0.4}
            for i in range(4)]
    Dataset.from_list(rows).save_to_disk(str(folder / "preference"))
    return folder


def _train(tiny_model, data, out, work, config, method="sft", *extra):
    dpo = ["train.dpo.learning_rate=1e-2", "train.dpo.per_device_train_batch_size=1"] if method != "sft" else []
    cfg = compose([f"model.name_or_path={tiny_model}", f"train={method}", "train.sft.learning_rate=1e-2",
                   "train.sft.per_device_train_batch_size=2", "train.num_processes=2", *dpo, *extra])
    return launch("train_generation", 2, config, method=method, parent=str(tiny_model), data_dir=data,
                  out_model=out, train_cfg=cfg.train, model_cfg=cfg.model, seed=0, work_dir=work)


def _check_whole(tiny_model, out) -> dict:
    """The generation has every tensor of the parent, whole, and some of them moved."""
    parent = load_file(str(Path(tiny_model) / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(parent)
    assert all(saved[k].shape == parent[k].shape and torch.isfinite(saved[k]).all() for k in parent)
    assert any(not torch.equal(saved[k], parent[k]) for k in parent)
    assert not (out / "adapter_config.json").exists()
    return saved


def _relative_l2(a: dict, b: dict) -> float:
    """selftrain.stages.train.weight_change from files: a tied tensor (the tiny model's lm_head and
    input embedding) counts once, as the file stores it."""
    keys = [*a]
    num = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in keys)
    return (num / sum(float(b[k].float().pow(2).sum()) for k in keys)) ** 0.5


@pytest.fixture(scope="module")
def data_parallel(tiny_model, tmp_path_factory):
    """The same training under plain data parallel: every rank holds the whole model."""
    tmp = tmp_path_factory.mktemp("dp")
    data = _data(tmp / "data")
    stats = _train(tiny_model, data, tmp / "gen-001" / "model", tmp / "work", None)
    assert "sharding" not in stats
    return data, load_file(str(tmp / "gen-001" / "model" / "model.safetensors")), stats


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gathered_generation_equals_data_parallel(tiny_model, data_parallel, sharded_on_cpu, tmp_path, strategy):
    data, reference, dp_stats = data_parallel
    out = tmp_path / "gen-001" / "model"
    stats = _train(tiny_model, data, out, tmp_path / "work", str(SHIM / f"{strategy}.yaml"))
    assert stats["sharding"] == strategy and stats["num_processes"] == 2 and stats["steps"] == dp_stats["steps"] == 2
    saved = _check_whole(tiny_model, out)
    for k in reference:
        torch.testing.assert_close(saved[k], reference[k], atol=1e-5, rtol=1e-4)
    # rank 0 computed the weight change from the gathered weights
    parent = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert stats["relative_l2"] == pytest.approx(_relative_l2(saved, parent), rel=1e-4)
    assert stats["relative_l2"] == pytest.approx(dp_stats["relative_l2"], rel=1e-3)
    assert not list((tmp_path / "work").glob("rank-*"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_lora_sft_then_dpo(tiny_model, sharded_on_cpu, tmp_path, strategy):
    """LoRA is merged on rank 0 into the full parent; DPO on every rank starts from rank 0's SFT model."""
    out = tmp_path / "gen-001" / "model"
    stats = _train(tiny_model, _data(tmp_path / "data"), out, tmp_path / "work", str(SHIM / f"{strategy}.yaml"),
                   "sft_dpo", "train.lora.enabled=true", "train.lora.r=4")
    assert stats["sharding"] == stats["sft"]["sharding"] == strategy and stats["lora"]
    saved = _check_whole(tiny_model, out)
    parent = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert all("proj" in k for k in parent if not torch.equal(saved[k], parent[k]))  # only adapted layers
    assert stats["reward_margin_first"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert stats["relative_l2"] == pytest.approx(_relative_l2(saved, parent), rel=1e-4)
    assert not (tmp_path / "work" / "sft_model").exists() and not list((tmp_path / "work").glob("rank-*"))


@pytest.mark.slow
def test_shipped_fsdp_config_full_sft_then_dpo(tiny_model, sharded_on_cpu, tmp_path):
    """conf/accelerate/fsdp.yaml as shipped (bf16 autocast, RAM-efficient loading); DPO's reference
    model, generation k loaded a second time, is sharded by TRL too."""
    out = tmp_path / "gen-001" / "model"
    stats = _train(tiny_model, _data(tmp_path / "data"), out, tmp_path / "work",
                   "builtin:conf/accelerate/fsdp.yaml", "sft_dpo")
    assert stats["sharding"] == "fsdp" and stats["sft"]["steps"] == 2 and stats["steps"] == 2
    _check_whole(tiny_model, out)
    assert stats["reward_margin_first"] == pytest.approx(0.0, abs=1e-5)
    assert stats["relative_l2"] > stats["dpo_relative_l2"] > 0


def test_sharded_config_without_gpu_is_one_line(tiny_model, tmp_path):
    """Without the shim accelerate would quietly run plain data parallel: refused, naming the file."""
    with pytest.raises(UserError) as e:
        _train(tiny_model, _data(tmp_path / "data"), tmp_path / "m", tmp_path / "w",
               "builtin:conf/accelerate/fsdp.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("train.accelerate_config=builtin:conf/accelerate/fsdp.yaml: FSDP needs GPUs")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("text, expected", [
    ("distributed_type: [unclosed", "not a readable YAML file"),
    ("fsdp_config: {}\n", "not an accelerate config (no `distributed_type:`)"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  zero3_save_16bit_model: false\n",
     "needs deepspeed" if not HAS_DEEPSPEED else "zero3_save_16bit_model: true"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: /nonexistent/ds.json\n",
     "needs deepspeed" if not HAS_DEEPSPEED else "not a readable JSON object"),
])
def test_bad_accelerate_config_is_one_line(tmp_path, text, expected):
    path = tmp_path / "acc.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        check_accelerate_config(str(path))
    assert expected in str(e.value) and str(e.value).startswith(f"train.accelerate_config={path}") \
        and "\n" not in str(e.value)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_zero3_json_without_gather_is_one_line(tmp_path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    (tmp_path / "acc.yaml").write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n"
                                       f"  deepspeed_config_file: {tmp_path / 'ds.json'}\n")
    with pytest.raises(UserError, match=r"ds.json: zero_optimization.stage3_gather_16bit_weights_on_model_save: true"):
        check_accelerate_config(str(tmp_path / "acc.yaml"))
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3, '
                                      '"stage3_gather_16bit_weights_on_model_save": true}}')
    assert check_accelerate_config(str(tmp_path / "acc.yaml")) == tmp_path / "acc.yaml"


def test_bad_accelerate_config_fails_validation(tiny_model, tmp_path):
    from selftrain.config.checks import validate

    path = tmp_path / "acc.yaml"
    path.write_text("fsdp_config: {}\n")
    cfg = compose([f"model.name_or_path={tiny_model}", "train.num_processes=2", f"train.accelerate_config={path}"])
    with pytest.raises(UserError, match="no `distributed_type:`"):
        validate(cfg)


@pytest.mark.skipif(HAS_DEEPSPEED, reason="checks the message shown when deepspeed is missing")
def test_deepspeed_missing_is_one_line():
    with pytest.raises(UserError, match=r"deepspeed_zero3.yaml needs deepspeed: pip install 'selftrain\[deepspeed\]'"):
        check_accelerate_config("builtin:conf/accelerate/deepspeed_zero3.yaml")


def test_deepspeed_precision_disagreement_is_one_line(monkeypatch, tmp_path):
    """Under DeepSpeed, train.sft.bf16 follows the accelerate config's mixed_precision; a contrary one is refused."""
    from selftrain.stages.train import sft_config

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = compose(["train.sft.bf16=false"])
    with pytest.raises(UserError, match=r"^train.sft.bf16=False: the DeepSpeed accelerate config sets "
                                        r"mixed_precision: bf16"):
        sft_config(cfg.train, tmp_path, 0)
