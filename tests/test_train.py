"""Training script: fine-tuning starts from an exported model folder; router-only moves only the gates."""
from pathlib import Path

import pytest
import torch

from emoe.config import ModelConfig
from emoe.train import TrainConfig, export, init_params, load_init, train
from emoe import default_model_dir

TINY = dict(hidden=32, layers=2, heads=2, kv_heads=1, experts=4, expert_inter=16, seq=32, batch=2)


@pytest.fixture()
def exported(tmp_path):
    cfg = TrainConfig(**TINY)
    params = init_params(ModelConfig.from_hf(cfg.model_config()), seed=3)
    export(params, ModelConfig.from_hf(cfg.model_config()), cfg, tmp_path / "m",
           Path(default_model_dir()) / "tokenizer.json")
    return tmp_path / "m", params


def test_load_init_restacks_an_exported_model(exported):
    folder, params = exported
    loaded = load_init(folder)
    assert set(loaded) == set(params)
    for k, v in params.items():
        assert loaded[k].shape == v.shape, k
        assert torch.equal(loaded[k], v.detach().to(torch.bfloat16).float()), k


def test_load_init_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(SystemExit, match="neither"):
        load_init(tmp_path)


def test_router_only_fine_tune_moves_only_the_gates(exported, tmp_path):
    folder, _ = exported
    cfg = TrainConfig(**TINY, minutes=0.05, lr=1e-2, seq_entropy=0.1, trainable="router")
    out = train(tmp_path / "ft", tmp_path / "run", None, cfg, init=folder)
    before, after = load_init(folder), load_init(out)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith("block_sparse_moe.gate.weight") for k in moved), moved


def test_trainable_must_be_known():
    with pytest.raises(ValueError, match="trainable"):
        TrainConfig(trainable="experts")
