"""Fit the category's threshold and the compared rules' candidates; score the candidates on test_public."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from hybridad.run_dir import RunDir
from hybridad.threshold_rules import ModelInputs, RuleInputs, all_rules, fit_threshold, get_rule
from hybridad.threshold_rules.candidates import score_candidates
from hybridad.thresholds import ScoreStats, ThresholdConfig
from hybridad.types import AnomalyOutput


class ThresholdCallback(L.Callback):
    """Collects the validation pixel statistics once per validation epoch, for every rule, and fits from them.

    - Each validation epoch end: the rule `threshold.method` names, when it is fitted from the statistics or
      the config (`hybridad.threshold_rules`), sets `pl_module.threshold` and `<run>/thresholds.yaml`.
    - After the stand-alone `trainer.validate` (final model): every compared label-free rule's candidate
      (`mean_std`; with `threshold.pseudo_repeats>0` the pseudo-defect rules, which run the model, and
      `capped_faint`) goes to thresholds.yaml `candidates:`; a configured rule fitted with the model sets the
      module's threshold here, before test.
    - After test: the SegF1 each candidate and each compared rule tuned on test reaches on test_public goes to
      `metrics.json` (`test_public/threshold=<rule>/seg_f1`, `.../value`).
    Rules that need test labels for the run's own threshold are fitted by `hybridad evaluate` from the cached
    test_public maps (see `hybridad.train`). The result and candidates are also kept in the checkpoint.
    """

    def __init__(self, cfg: ThresholdConfig, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = RunDir(run_dir) if run_dir is not None else None
        self.stats = ScoreStats()
        self.result: dict[str, Any] = {}
        self.candidates: dict[str, Any] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats = ScoreStats().to(pl_module.device)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, AnomalyOutput):
            self.stats.update(outputs.anomaly_map)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rule = get_rule(self.cfg.method)
        if trainer.sanity_checking or rule.tuned_on_test or rule.fitted_with_model:  # fitted later
            return
        stats = self.stats.summed_over_ranks()  # every rank's validation pixels
        result = fit_threshold(self.cfg, stats)
        self._set(trainer, pl_module, {
            "value": float(result.value), "method": result.method, "source": result.source,
            "tuned_on_test": bool(result.tuned_on_test), "stats": {"mean": stats.mean, "std": stats.std},
        })
        pl_module.log("val/threshold", float(result.value), sync_dist=True)
        if self.run_dir is not None and trainer.is_global_zero:
            self.run_dir.write_thresholds(self.result)

    def _set(self, trainer: L.Trainer, pl_module: L.LightningModule, record: dict[str, Any]) -> None:
        pl_module.set_threshold(record["value"])  # type: ignore[operator]
        self.result = record

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking
        if not final or trainer.datamodule is None:
            return
        stats = self.stats.summed_over_ranks()
        device = pl_module.device

        def reduce_sum(t: Tensor) -> Tensor:  # NCCL reduces device tensors
            return trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu()

        model = ModelInputs(pl_module, trainer.datamodule,  # type: ignore[arg-type]
                            trainer.global_rank, trainer.world_size, reduce_sum)
        inputs = RuleInputs(stats=stats, model=model)
        own = get_rule(self.cfg.method)
        for rule in all_rules():  # registry order: a rule may read the candidates found before it
            if rule.tuned_on_test or not (rule.compared or (rule is own and rule.fitted_with_model)):
                continue
            record = rule.candidate(self.cfg, inputs)
            if record is not None:
                inputs.found[rule.name] = record
        self.candidates = inputs.found
        if own.fitted_with_model:
            result = fit_threshold(self.cfg, pseudo=(self.candidates.get(own.name) or {}).get("value"))
            self._set(trainer, pl_module, {
                "value": result.value, "method": result.method, "source": result.source,
                "tuned_on_test": result.tuned_on_test, "stats": {"mean": stats.mean, "std": stats.std},
            })
        if self.run_dir is not None and trainer.is_global_zero:
            record = self.result or self.run_dir.read_thresholds()
            self.run_dir.write_thresholds({**record, "candidates": self.candidates})

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_dir is None or not self.candidates or trainer.datamodule is None:
            return
        trainer.strategy.barrier()  # every rank's maps are on disk
        if not trainer.is_global_zero:
            return
        values = {rule: c["value"] for rule, c in self.candidates.items() if c.get("value") is not None}
        metrics = score_candidates(self.run_dir.path, values, pl_module.postprocess,  # type: ignore[arg-type]
                                   trainer.datamodule.config, self.cfg)  # type: ignore[attr-defined]
        self.run_dir.write_metrics(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"result": self.result, "candidates": self.candidates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.result = dict(state_dict.get("result", self.result))
        self.candidates = dict(state_dict.get("candidates", self.candidates))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the two threshold callbacks were merged kept the candidates under
        `PseudoThresholdCallback` (the result's key, `ThresholdCallback`, is this callback's own)."""
        old = (checkpoint.get("callbacks") or {}).get("PseudoThresholdCallback")
        if isinstance(old, dict) and "candidates" in old:
            self.candidates = dict(old["candidates"])
