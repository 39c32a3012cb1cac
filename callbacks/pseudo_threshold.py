"""Threshold candidates of a run: mean + k std and the pseudo-defect rules (pasted pseudo-anomalies), then their
SegF1."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from hybridad.pseudo_threshold import RECIPES, candidate_grid, capped_faint, pseudo_counts, score_candidates
from hybridad.run_dir import RunDir
from hybridad.thresholds import PSEUDO_METHODS, ScoreStats, ThresholdConfig, fit_threshold, mean_std_threshold
from hybridad.types import AnomalyOutput


class PseudoThresholdCallback(L.Callback):
    """After the stand-alone `trainer.validate` (final model), fits the label-free threshold candidates.

    `mean_std` comes from the validation pixel scores, `pseudo_f1` and `pseudo_faint` from
    `hybridad.pseudo_threshold`, `capped_faint` = min(mean_std, pseudo_faint) (the pseudo rules are skipped
    when `threshold.pseudo_repeats=0`). With `threshold.method` one of those, the module's threshold is set
    here, before test. Candidates go to `<run>/thresholds.yaml` (`candidates:`); after test, the SegF1 each
    candidate and the test-tuned F1-optimal threshold reach on test_public goes to `metrics.json`
    (`test_public/threshold=<rule>/seg_f1`, `.../value`).
    """

    def __init__(self, cfg: ThresholdConfig, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = RunDir(run_dir) if run_dir is not None else None
        self.stats = ScoreStats()
        self.candidates: dict[str, Any] = {}

    @staticmethod
    def _final_validation(trainer: L.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats = ScoreStats().to(pl_module.device)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._final_validation(trainer) and isinstance(outputs, AnomalyOutput):
            self.stats.update(outputs.anomaly_map)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._final_validation(trainer) or trainer.datamodule is None:
            return
        with self.stats.sync_context():
            mean, std = float(self.stats.mean), float(self.stats.std)
        value = mean_std_threshold(mean, std, self.cfg.k)
        stats = {"mean": mean, "std": std}
        cands: dict[str, Any] = {"mean_std": {"value": value, "k": self.cfg.k, "stats": stats}}
        if self.cfg.pseudo_repeats > 0:
            with self.stats.sync_context():
                grid = candidate_grid(self.stats)
            raw: dict[str, float] = {}  # inf where nothing was pasted
            for name, recipe in RECIPES.items():
                counts = pseudo_counts(pl_module, trainer.datamodule, self.cfg, grid,  # type: ignore[arg-type]
                                       recipe, trainer.global_rank, trainer.world_size)
                for key in ("pos", "neg", "tp", "fp", "fn"):  # sum over ranks (each scored a share)
                    part = getattr(counts, key).to(pl_module.device)  # NCCL reduces device tensors
                    setattr(counts, key, trainer.strategy.reduce(part, reduce_op="sum").cpu())
                thr, f1 = counts.pick(recipe)
                raw[name] = thr
                cands[name] = {"value": thr if math.isfinite(thr) else None, "pseudo_seg_f1": f1,
                               "repeats": self.cfg.pseudo_repeats, "seed": self.cfg.pseudo_seed,
                               "scale_of": self.cfg.pseudo_scale_of, "pasted_pixels": float(counts.pos.sum())}
            cands["capped_faint"] = {"value": capped_faint(value, raw["pseudo_faint"]), "k": self.cfg.k}
        self.candidates = cands
        record: dict[str, Any] = {}
        if self.cfg.method in PSEUDO_METHODS:
            pseudo = (cands.get(self.cfg.method) or {}).get("value")
            result = fit_threshold(self.cfg, pseudo=pseudo)
            pl_module.set_threshold(result.value)  # type: ignore[operator]
            record = {"value": result.value, "method": result.method, "source": result.source,
                      "tuned_on_test": False, "stats": {"mean": mean, "std": std}}
        if self.run_dir is not None and trainer.is_global_zero:
            record = record or self.run_dir.read_thresholds()
            self.run_dir.write_thresholds({**record, "candidates": cands})

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_dir is None or not self.candidates or trainer.datamodule is None:
            return
        trainer.strategy.barrier()  # every rank's maps are on disk
        if not trainer.is_global_zero:
            return
        values = {rule: c["value"] for rule, c in self.candidates.items() if c.get("value") is not None}
        metrics = score_candidates(self.run_dir.path, values, pl_module.postprocess,  # type: ignore[arg-type]
                                   trainer.datamodule.config)  # type: ignore[attr-defined]
        self.run_dir.write_metrics(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"candidates": self.candidates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.candidates = dict(state_dict.get("candidates", {}))
