"""SFT on the tiny model: the weights change, the checkpoint is safetensors, LoRA merges."""
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from conftest import compose
from selftrain.train import train_sft


@pytest.fixture
def sft_data(tmp_path):
    rows = [{"prompt_id": str(i), "messages": [{"role": "user", "content": f"Question {i}?"},
                                                {"role": "assistant", "content": f"A careful answer number {i}."}]}
            for i in range(6)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "sft"))
    return tmp_path / "sft"


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
    if lora:  # only the adapted projections move
        assert all(any(m in k for m in ("proj",)) for k in changed)
    assert (tmp_path / "work" / "train_log.json").is_file()
    assert not (out.parent / ".model.tmp").exists()
