"""The train stage under `accelerate launch`: 2 gloo processes on CPU, the tiny model.

Data parallel over 2 processes: 8 rows at 2 per device make 2 optimizer steps (4 rows a
step), against 4 steps in one process. Only rank 0 writes the next generation.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose, write_sft_data
from selftrain import UserError
from selftrain.stages.train_worker import launch


@pytest.fixture
def sft_data(tmp_path):
    return write_sft_data(tmp_path / "sft", 8)


def _cfg(tiny_model, *extra):
    return compose([f"model.name_or_path={tiny_model}", "train.sft.learning_rate=1e-2",
                    "train.sft.per_device_train_batch_size=2", "train.num_processes=2", *extra])


@pytest.mark.slow
def test_two_processes_change_weights(tiny_model, sft_data, tmp_path):
    cfg = _cfg(tiny_model)
    out = tmp_path / "gen-001" / "model"
    stats = launch("train_sft", cfg.train.num_processes, cfg.train.accelerate_config, parent=str(tiny_model),
                   data_dir=sft_data, out_model=out, train_cfg=cfg.train, model_cfg=cfg.model, seed=0,
                   work_dir=tmp_path / "work")
    assert stats["num_processes"] == 2
    assert stats["steps"] == 2  # 8 rows / (2 per device x 2 processes)
    before = load_file(str(Path(tiny_model) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before) and stats["relative_l2"] > 0
    assert (tmp_path / "work" / "train_log.json").is_file()
    assert not list((tmp_path / "work").glob("rank-*"))  # the other rank's scratch copy is gone


def test_worker_failure_is_one_line(tiny_model, tmp_path):
    """A dataset folder that is not a dataset: the ranks fail, the driver gets one line."""
    cfg = _cfg(tiny_model)
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(UserError) as e:
        launch("train_sft", 2, None, parent=str(tiny_model), data_dir=tmp_path / "not_a_dataset",
               out_model=tmp_path / "m", train_cfg=cfg.train, model_cfg=cfg.model, seed=0, work_dir=tmp_path / "w")
    msg = str(e.value)
    assert "\n" not in msg and "train.num_processes=2" in msg and "accelerate.log" in msg
    assert not (tmp_path / "m").exists()
