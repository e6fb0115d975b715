"""SFT on the tiny model: the weights change, the checkpoint is safetensors, LoRA merges."""
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from conftest import compose, write_sft_data
from selftrain.stages.train import train_sft


@pytest.fixture
def sft_data(tmp_path):
    return write_sft_data(tmp_path / "sft", 6)


@pytest.mark.parametrize("lora", [False, True])
def test_training_changes_weights(tiny_model, sft_data, tmp_path, lora):
    cfg = compose([f"model.name_or_path={tiny_model}", "train.sft.learning_rate=1e-2",
                   "train.sft.per_device_train_batch_size=2", f"train.lora.enabled={lora}",
                   "train.lora.r=4"])
    out = tmp_path / "gen-001" / "model"
    stats = train_sft(str(tiny_model), sft_data, out, cfg.train, cfg.model, seed=0, work_dir=tmp_path / "work")
    assert stats["steps"] == 3 and stats["rows"] == 6
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert not (out / "adapter_config.json").exists()  # LoRA is merged into plain weights
    before = load_file(str(Path(tiny_model) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and stats["relative_l2"] > 0
    # measured against the parent's file, each tensor (the tied output layer counted once) as saved
    num = sum(float((after[k].float() - before[k].float()).pow(2).sum()) for k in before)
    assert stats["relative_l2"] == pytest.approx((num / sum(float(v.float().pow(2).sum()) for v in before.values())) ** 0.5,
                                                 rel=1e-4)
    assert stats["tensors_changed"] == len(changed)
    if lora:  # only the adapted projections move
        assert all(any(m in k for m in ("proj",)) for k in changed)
    assert (tmp_path / "work" / "train_log.json").is_file()
    assert not (out.parent / ".model.tmp").exists()
    assert not list(sft_data.glob("cache-*"))  # read in memory: TRL's map wrote nothing into the data


@pytest.fixture
def pref_data(tmp_path):
    rows = [{"prompt_id": str(i), "prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"A careful, honest answer number {i}."}],
             "rejected": [{"role": "assistant", "content": f"No. Go away {i}."}], "label": 0.7, "margin": 0.4}
            for i in range(6)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "preference"))
    return tmp_path / "preference"


def _changed(tiny_model, out):
    before = load_file(str(Path(tiny_model) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    return [k for k in before if not torch.equal(before[k], after[k])]


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_changes_weights_and_logs_rewards(tiny_model, pref_data, tmp_path, lora):
    import json

    from selftrain.stages.train import train_dpo

    cfg = compose([f"model.name_or_path={tiny_model}", "train=dpo", "train.dpo.learning_rate=1e-2",
                   "train.dpo.per_device_train_batch_size=2", f"train.lora.enabled={lora}", "train.lora.r=4"])
    out = tmp_path / "gen-001" / "model"
    stats = train_dpo(str(tiny_model), pref_data, out, cfg.train, cfg.model, seed=0, work_dir=tmp_path / "work")
    assert stats["steps"] == 3 and stats["rows"] == 6 and stats["reference"] == str(tiny_model)
    assert not (out / "adapter_config.json").exists()
    changed = _changed(tiny_model, out)
    assert changed and stats["relative_l2"] > 0
    if lora:
        assert all("proj" in k for k in changed)
    logs = json.loads((tmp_path / "work" / "train_log.json").read_text())
    margins = [r["rewards/margins"] for r in logs if "rewards/margins" in r]
    assert len(margins) == 3 and stats["reward_margin_last"] == margins[-1]
    assert 0 <= stats["reward_accuracy_mean"] <= 1
    # step 1: the policy equals the reference (generation k), so its reward margin is zero
    assert margins[0] == pytest.approx(0.0, abs=1e-5)
    assert not list(pref_data.glob("cache-*"))  # read in memory: TRL's map wrote nothing into the data


def test_sft_then_dpo(tiny_model, pref_data, sft_data, tmp_path):
    import shutil

    from selftrain.stages.train import train_sft_dpo

    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(sft_data, data / "sft")
    shutil.copytree(pref_data, data / "preference")
    cfg = compose([f"model.name_or_path={tiny_model}", "train=sft_dpo", "train.dpo.learning_rate=1e-2",
                   "train.sft.learning_rate=1e-2", "train.sft.per_device_train_batch_size=3",
                   "train.dpo.per_device_train_batch_size=3"])
    out = tmp_path / "gen-001" / "model"
    stats = train_sft_dpo(str(tiny_model), data, out, cfg.train, cfg.model, seed=0, work_dir=tmp_path / "work")
    assert stats["method"] == "sft_dpo" and stats["sft"]["steps"] == 2 and stats["steps"] == 2
    assert stats["reference"] == str(tmp_path / "work" / "sft_model")  # DPO starts from the SFT model
    assert not (tmp_path / "work" / "sft_model").exists()
    assert _changed(tiny_model, out) and stats["relative_l2"] > 0
    assert (tmp_path / "work" / "sft" / "train_log.json").is_file()
    assert (tmp_path / "work" / "train_log.json").is_file()


def test_dpo_names_missing_field(tiny_model, tmp_path):
    from selftrain import UserError
    from selftrain.stages.train import train_dpo

    Dataset.from_list([{"prompt": [{"role": "user", "content": "Hi"}],
                        "chosen": [{"role": "assistant", "content": "Hello"}]}]).save_to_disk(str(tmp_path / "p"))
    cfg = compose([f"model.name_or_path={tiny_model}", "train=dpo"])
    with pytest.raises(UserError, match="no 'rejected' field"):
        train_dpo(str(tiny_model), tmp_path / "p", tmp_path / "m", cfg.train, cfg.model, seed=0, work_dir=tmp_path)


def test_parent_weights_read_from_the_file_or_copied(tiny_model, tmp_path):
    """The weight change's baseline: the parent's safetensors, one tensor at a time, where they
    name every weight; a copy of the loaded weights where they do not (here: no safetensors)."""
    import shutil

    from selftrain.models import load_model
    from selftrain.stages.train import _SavedWeights, parent_weights, saved_weights, weight_change

    model = load_model(str(tiny_model))
    lazy = parent_weights(str(tiny_model), model)
    assert isinstance(lazy, _SavedWeights)  # nothing held in memory: read when asked for
    own = model.state_dict()
    assert all(torch.equal(lazy.get(k), own[k]) for k in lazy.files)
    assert weight_change(lazy, model) == {"relative_l2": 0.0, "tensors_changed": 0}
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare, ignore=shutil.ignore_patterns("*.safetensors*"))
    assert saved_weights(str(bare), model) is None
    copied = parent_weights(str(bare), model)
    assert type(copied) is dict and set(copied) == set(own)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert weight_change(copied, model)["tensors_changed"] == 1  # the copy was taken before the change
    assert weight_change(lazy, model)["tensors_changed"] == 1


def test_dpo_stops_after_a_first_sigint_and_saves_nothing(tiny_model, pref_data, tmp_path, monkeypatch):
    import os
    import signal

    import selftrain.stages.train as train
    from selftrain.run.interrupts import Interrupted, graceful_interrupts

    steps = []

    class SignalAtFirstStep(train.StopOnInterrupt):
        """The real callback, plus a SIGINT to this process as the first step begins."""
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 0:
                os.kill(os.getpid(), signal.SIGINT)
            return control

        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)
            return super().on_step_end(args, state, control, **kw)

    monkeypatch.setattr(train, "StopOnInterrupt", SignalAtFirstStep)
    cfg = compose([f"model.name_or_path={tiny_model}", "train=dpo", "train.dpo.per_device_train_batch_size=2"])
    out = tmp_path / "gen-001" / "model"
    with graceful_interrupts(), pytest.raises(Interrupted):
        train.train_dpo(str(tiny_model), pref_data, out, cfg.train, cfg.model, seed=0, work_dir=tmp_path / "w")
    assert steps == [1]  # stopped at the end of the step the signal arrived in, not after all 3
    assert not out.exists() and not (tmp_path / "w" / "train_log.json").exists()


def test_dpo_loads_a_pickle_checkpoint_only_when_allowed(tiny_model, pref_data, tmp_path):
    import shutil

    from selftrain import UserError
    from selftrain.stages.train import train_dpo

    pkl = tmp_path / "pickled"
    shutil.copytree(tiny_model, pkl)
    state = load_file(str(pkl / "model.safetensors"))
    (pkl / "model.safetensors").unlink()
    torch.save(state, pkl / "pytorch_model.bin")
    base = [f"model.name_or_path={pkl}", "train=dpo", "train.dpo.per_device_train_batch_size=2",
            "+train.dpo.max_steps=1"]
    cfg = compose(base)
    with pytest.raises(UserError, match="allow_pickle"):
        train_dpo(str(pkl), pref_data, tmp_path / "m1", cfg.train, cfg.model, seed=0, work_dir=tmp_path / "w1")
    cfg = compose(base + ["model.allow_pickle=true"])
    stats = train_dpo(str(pkl), pref_data, tmp_path / "m2", cfg.train, cfg.model, seed=0, work_dir=tmp_path / "w2")
    assert stats["steps"] == 1 and (tmp_path / "m2" / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_non_finite_loss_stops_and_saves_nothing(tiny_model, sft_data, pref_data, tmp_path, method):
    """Both methods share the guard: a loss gone NaN/inf stops training, names the keys to lower,
    and writes no generation."""
    from selftrain import UserError
    from selftrain.stages.train import train_dpo

    cfg = compose([f"model.name_or_path={tiny_model}", f"train={method}", f"train.{method}.learning_rate=1e30",
                   f"train.{method}.per_device_train_batch_size=2"])
    fn, data = (train_sft, sft_data) if method == "sft" else (train_dpo, pref_data)
    out = tmp_path / "gen-001" / "model"
    with pytest.raises(UserError, match=rf"NaN or infinite at step \d+; lower train\.{method}\.learning_rate"):
        fn(str(tiny_model), data, out, cfg.train, cfg.model, seed=0, work_dir=tmp_path / "work")
    assert not out.exists()
