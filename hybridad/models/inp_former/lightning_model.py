"""INP-Former training system: loss, StableAdamW, warm-up + cosine schedule, small checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from hybridad.errors import UserError
from hybridad.inp_map_path import tile_maps_from_groups
from hybridad.models.anomaly_module import AnomalyModule
from hybridad.models.inp_former.config import InpFormerConfig
from hybridad.models.inp_former.loss import InpFormerLoss
from hybridad.models.inp_former.optim import StableAdamW, effective_warmup, warmup_cosine_scheduler
from hybridad.models.inp_former.torch_model import InpFormerModel, InpFormerOutput
from hybridad.models.inp_former.weights import load_encoder_weights, read_state_dict
from hybridad.postprocess import PostProcessConfig
from hybridad.tile_grid import native_tile_size
from hybridad.types import AnomalyOutput, Batch

ENCODER_PREFIX = "model.encoder."


class InpFormer(AnomalyModule):
    """INP-Former branch.

    Training uses normal tiles only: tiles with cut-paste defects (`batch.label == 1`) are dropped from the
    loss unless `cfg.train_on_pasted` (INP-Former reconstructs normal features; pasted defects would teach it
    to reconstruct them). Gradient clipping (global norm `cfg.grad_clip`, 0.1) is applied in
    `configure_gradient_clipping` unless the Trainer sets its own `gradient_clip_val`.
    The frozen encoder is not stored in checkpoints: it is rebuilt from `cfg.weights` / `cfg.checkpoint`
    (or from `cfg.encoder_seed` for random encoders) when the module is constructed.

    Args:
        cfg: architecture, encoder source and optimisation settings (as `Cpr(cfg=...)`).
        postprocess: map smoothing and mask post-processing settings.
        top_ratio: image score = mean of the top `top_ratio` fraction of the native map.
        model: the former name of `cfg`, still accepted so that older checkpoints' hyperparameters load.
    """

    def __init__(
        self,
        cfg: InpFormerConfig | dict[str, Any] | None = None,
        postprocess: PostProcessConfig | dict[str, Any] | None = None,
        top_ratio: float = 0.01,
        model: InpFormerConfig | dict[str, Any] | None = None,
    ) -> None:
        cfg = cfg if cfg is not None else model  # `model`: the name checkpoints written before 2026-12 store
        cfg = InpFormerConfig(**cfg) if isinstance(cfg, dict) else (cfg or InpFormerConfig())
        pp = PostProcessConfig(**postprocess) if isinstance(postprocess, dict) else (postprocess or PostProcessConfig())
        if not (cfg.weights or cfg.checkpoint or cfg.preset == "tiny" or cfg.random_encoder):
            raise UserError(
                f"inp_former.weights is empty: point it at a DINOv2 file for {cfg.encoder} "
                "(e.g. dinov2_vitl14_reg4_pretrain.pth from https://dl.fbaipublicfiles.com/dinov2/), "
                "or use inp_former.preset=tiny for a quick random-init test"
            )
        super().__init__(postprocess=pp, top_ratio=top_ratio)
        # plain dicts, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"cfg": asdict(cfg), "postprocess": asdict(pp), "top_ratio": top_ratio})
        self.cfg = cfg
        self.model = InpFormerModel.from_config(cfg)
        self.loss_fn = InpFormerLoss(cfg.coherence_weight, cfg.soft_mining_gamma)
        self._load_weights(cfg)

    def _load_weights(self, cfg: InpFormerConfig) -> None:
        if cfg.weights:
            load_encoder_weights(self.model.encoder, cfg.weights, self.model.encoder_name)
        if cfg.checkpoint:
            try:
                sd = read_state_dict(Path(cfg.checkpoint))
            except Exception as err:
                raise UserError(f"inp_former.checkpoint: cannot read '{cfg.checkpoint}' ({err})") from None
            if all(k.startswith("model.") for k in sd):  # a Lightning checkpoint of this module
                sd = {k[len("model.") :]: v for k, v in sd.items()}
            if cfg.weights:  # the DINOv2 file wins for the encoder
                sd = {k: v for k, v in sd.items() if not k.startswith("encoder.")}
            own = self.model.state_dict()
            bad = [k for k in sd if k not in own or own[k].shape != sd[k].shape]
            missing = [k for k in own if k not in sd and not (cfg.weights and k.startswith("encoder."))]
            if bad or missing:
                raise UserError(
                    f"inp_former.checkpoint: '{cfg.checkpoint}' does not match inp_former.encoder="
                    f"{cfg.encoder} / num_inps={cfg.num_inps} (first mismatch: {(bad or missing)[0]}); write it "
                    "with `hybridad convert inp-former` and set the same encoder"
                )
            self.model.load_state_dict(sd, strict=False)

    def tile_maps(self, tiles: Tensor, native_size: tuple[int, int] | None = None) -> Tensor:
        """(N,3,S,S) float tiles in [0,1] -> (N,1,H,W) maps through `model.map_smoothing` (mean over groups of
        1 - cos, upsampled and smoothed; H,W = `native_size`, the tiles' box in the image, default S,S)."""
        return self._maps_from_output(self.model(tiles), tiles, native_size)

    def _maps_from_output(self, out: InpFormerOutput, tiles: Tensor, native_size: tuple[int, int] | None) -> Tensor:
        input_size = (int(tiles.shape[-2]), int(tiles.shape[-1]))
        return tile_maps_from_groups(self.model.group_maps(out), self.cfg.map_smoothing,
                                     native_size or input_size, input_size)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images = batch.image
        if not self.cfg.train_on_pasted and batch.mask is not None:
            normal = batch.mask.flatten(1).amax(dim=1) == 0  # (N,) tiles without pasted defects
            if not bool(normal.all()):
                images = images[normal]
        if images.shape[0] == 0:
            # every tile got a pseudo-defect: a zero loss that still reaches every trainable parameter, so
            # backward (and DDP's gradient all-reduce) runs on every rank; skipping it here would stall the others
            return sum(p.sum() for p in self.model.trainable_parameters()) * 0.0
        losses = self.loss_fn(self.model(images))
        bs = images.shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        self.log("train/cosine", losses["cosine"], batch_size=bs)
        self.log("train/coherence", losses["coherence"], batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> AnomalyOutput:
        """Maps for the threshold statistics, plus the training loss on validation/good tiles (`val/loss`), from
        one forward pass."""
        assert batch.tiles is not None and batch.layout is not None
        with torch.no_grad():
            out = self.model(batch.tiles)
            losses = self.loss_fn(out)
            tile_maps = self._maps_from_output(out, batch.tiles, native_tile_size(batch.layout))
        self.log("val/loss", losses["loss"], batch_size=batch.tiles.shape[0], sync_dist=True)
        return self.output_from_tile_maps(tile_maps, batch)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.cfg
        optimizer = StableAdamW(
            self.model.trainable_parameters(),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            amsgrad=cfg.amsgrad,
        )
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) and total > 0 else 10**9
        warmup = effective_warmup(cfg.warmup_steps, total, cfg.warmup_max_fraction)
        scheduler = warmup_cosine_scheduler(optimizer, total, warmup, cfg.lr, cfg.final_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.cfg.grad_clip
        if clip and clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm)

    # --- small checkpoints: the frozen encoder is rebuilt, not stored -------------------------------------------

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in sd if k.startswith(prefix + ENCODER_PREFIX)]:
            del sd[key]
        return sd

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load, re-inserting the encoder weights this module was built with when the dict lacks them."""
        state_dict = dict(state_dict)
        for key, value in self.model.encoder.state_dict(prefix=ENCODER_PREFIX).items():
            state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
