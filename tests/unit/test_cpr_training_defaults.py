"""CPR trains without in-training validation (as the winners) and builds its memory bank once for evaluation."""

from __future__ import annotations

import pytest
import torch

from hybridad.config import load_config
from hybridad.models.cpr.config import CprConfig
from hybridad.models.cpr.lightning_model import Cpr


@pytest.mark.parametrize("category", ["fruit_jelly", "vial", "can", "wallplugs"])
def test_no_category_validates_while_training_by_default(category: str, tmp_path) -> None:
    from hybridad.train import build_trainer

    cfg = load_config([f"data.category={category}", "logging.wandb=false"])
    assert cfg.branch == ("cpr" if category in ("fruit_jelly", "vial") else "inp_former")
    trainer = build_trainer(cfg, tmp_path)
    # Lightning validates every `check_val_every_n_epoch` epochs; an epoch has at least one step, so a period
    # above max_steps / max_epochs means no validation (and no CPR bank rebuild) before training ends
    assert trainer.check_val_every_n_epoch > max(cfg.trainer.max_steps, cfg.trainer.max_epochs) > 0
    assert cfg.trainer.num_sanity_val_steps == 0
    on = build_trainer(load_config([f"data.category={category}", "logging.wandb=false",
                                    "trainer.check_val_every_n_epoch=2"]), tmp_path)
    assert on.check_val_every_n_epoch == 2


def test_bank_built_once_for_validate_test_predict(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CprConfig(preset="tiny", image_size=64, out_dim=32, k_nearest=2, grb_samples=2000, feb_samples=2000,
                    samples_per_image=256, kmeans_iters=5, kmeans_inits=1)  # fmt: skip
    module = Cpr(cfg)
    torch.manual_seed(0)
    module.fit_references(torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8))
    builds = []
    original = module.model.build_memory_bank
    monkeypatch.setattr(module.model, "build_memory_bank", lambda images: (builds.append(1), original(images)))
    module.on_fit_end()  # after the last training step
    module.on_validation_start()  # the threshold pass
    module.on_test_start()
    module.on_predict_start()
    module.tile_maps(torch.rand(1, 3, 64, 64))
    assert len(builds) == 1
