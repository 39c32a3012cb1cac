"""CPR training system: reference store, pair sampling, contrastive loss, memory-bank life cycle."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridad.errors import UserError
from hybridad.models.anomaly_module import AnomalyModule
from hybridad.models.cpr.config import CprConfig
from hybridad.models.cpr.foreground import positive_sampling_weight
from hybridad.models.cpr.loss import cpr_loss, perlin_anomalies, salt_pepper, sample_pairs
from hybridad.models.cpr.torch_model import CprModel
from hybridad.postprocess import PostProcessConfig
from hybridad.types import Batch


def pair_seed(seed: int, step: int, rank: int) -> int:
    """Seed of a training step's generator (reference pick, noise, pair sampling), distinct per step and
    rank so that DDP ranks draw different pairs (the DataModule's cut-paste generator uses this formula)."""
    return ((seed * 1_000_003 + step) * 1009 + rank) % 2**62


class Cpr(AnomalyModule):
    """CPR branch. Only the two LRB heads are trained; GRB/FEB are fitted in closed form before training.

    Reference store: the training images at `cfg.image_size`, uint8 on the CPU, keyed by sample id. It is filled by
    `fit_references(images, ids)` or, at fit/eval start when empty, from the DataModule: `datamodule.dataset("train")`
    items (dicts with `image` (3,H,W) uint8, `sample_id`, optional `tile_box`) deduplicated by sample id and cropped to
    their tile box. A training query finds its clean reference through its sample id (`batch.sample_id`, one per
    tile): one of its source image's K global neighbours (self excluded). Queries with an unknown id retrieve their
    neighbours from their own histogram, dropping the best match. Positives assume query and reference are aligned,
    i.e. whole-image tiles (as for fruit_jelly and vial).

    The memory bank is rebuilt from the store after fitting and before validate/test/predict when stale.

    Args:
        cfg: CPR settings.
        postprocess: map smoothing / mask post-processing (shared eval path).
    """

    def __init__(self, cfg: CprConfig | None = None, postprocess: PostProcessConfig | None = None) -> None:
        super().__init__(postprocess=postprocess)  # image score: CPR's own top-T sum (`image_score`)
        self.cfg = cfg or CprConfig()
        self.save_hyperparameters(ignore=["postprocess"])
        self.model = CprModel(self.cfg)
        self._ref_images: Tensor | None = None  # (N, 3, S, S) uint8, CPU
        self._ref_index: dict[str, int] = {}
        self._bank_stale = True

    # ------------------------------------------------------------ references and bank
    def fit_references(self, images: Tensor, ids: list[str] | None = None) -> None:
        """Set the reference store from (N, 3, H, W) uint8 or float [0, 1] images and fit GRB / FEB on it."""
        s = self.cfg.image_size
        x = images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255).round().to(torch.uint8)
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x.float(), size=(s, s), mode="bilinear", align_corners=False, antialias=False)
            x = x.round().clamp(0, 255).to(torch.uint8)
        self._ref_images = x.cpu().contiguous()
        self._ref_index = {sid: i for i, sid in enumerate(ids or [])}
        self.model.fit_retrieval(self._ref_images)
        self._bank_stale = True

    def _references_from_datamodule(self) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "dataset"):
            raise UserError("CPR needs its training images: call Cpr.fit_references(images) or use a DataModule")
        ds = dm.dataset("train")
        images, ids, seen = [], [], set()
        for i in range(len(ds)):  # items are dataset dicts; CPU augmentations of the train split apply here too
            item = ds[i]
            if item["sample_id"] in seen:
                continue
            seen.add(item["sample_id"])
            img = item["image"]  # (3, H, W) uint8
            box = item.get("tile_box")
            if box is not None:
                y0, x0, y1, x1 = (int(v) for v in box)
                img = img[:, y0:y1, x0:x1]
            s = self.cfg.image_size
            img = F.interpolate(img[None].float(), size=(s, s), mode="bilinear", align_corners=False, antialias=False)
            images.append(img.round().clamp(0, 255).to(torch.uint8))
            ids.append(item["sample_id"])
        self.fit_references(torch.cat(images), ids)

    def _ensure_bank(self) -> None:
        if self._ref_images is None:
            self._references_from_datamodule()
        if self._bank_stale or not self.model.bank:
            assert self._ref_images is not None
            self.model.build_memory_bank(self._ref_images)
            self._bank_stale = False

    def on_fit_start(self) -> None:
        if self._ref_images is None:
            self._references_from_datamodule()
        elif not bool(self.model.grb.fitted):
            self.model.fit_retrieval(self._ref_images)

    def on_fit_end(self) -> None:
        self._bank_stale = True
        self._ensure_bank()

    def on_validation_start(self) -> None:
        self._ensure_bank()

    def on_test_start(self) -> None:
        self._ensure_bank()

    def on_predict_start(self) -> None:
        self._ensure_bank()

    # ------------------------------------------------------------ training
    def _reference_for(self, x: Tensor, sample_ids: list[str], gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Query indices in the store (-1 unknown) and the chosen reference index per query, both (N,)."""
        n, k = x.shape[0], self.cfg.k_nearest
        ids = list(sample_ids) if len(sample_ids) == n else [""] * n
        src = torch.tensor([self._ref_index.get(i, -1) for i in ids], device=self.device)  # (N,)
        assert self.model.train_neighbours is not None
        cand = self.model.train_neighbours.to(self.device)[src.clamp_min(0)]  # (N, K)
        if bool((src < 0).any()):
            feats = self.model.trunk(self.model.preprocess(x))[0]
            own = self.model.grb.neighbours(self.model.grb.histograms(feats), k + 1)[:, 1:]  # (N, K) best dropped
            width = min(own.shape[1], cand.shape[1])
            cand = torch.where(src[:, None] >= 0, cand[:, :width], own[:, :width])
        pick = torch.randint(cand.shape[1], (n,), generator=gen, device=self.device)
        return src, cand.gather(1, pick[:, None])[:, 0]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        cfg = self.cfg
        x = batch.image.float()  # (N, 3, S, S) in [0, 1]
        n, s = x.shape[0], x.shape[-1]
        mask = batch.mask if batch.mask is not None else x.new_zeros(n, 1, s, s)
        seed = pair_seed(cfg.seed, self.global_step, self.global_rank)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        assert self._ref_images is not None and self.model.bank_fg is not None
        src, ref = self._reference_for(x, list(batch.sample_id), gen)
        bank_fg = self.model.bank_fg.to(self.device).float()  # (Ntrain, 1, h, w)
        if cfg.synthesis == "perlin":
            fg_src = F.interpolate(bank_fg[src.clamp_min(0)], size=(s, s), mode="bilinear", align_corners=False)
            fg_src = torch.where(src[:, None, None, None] >= 0, fg_src, torch.ones_like(fg_src))
            x, mask = perlin_anomalies(x, fg_src if cfg.foreground else None, gen)
        r = self._ref_images[ref.cpu()].to(self.device).float() / 255  # (N, 3, S0, S0)
        if r.shape[-1] != s:
            r = F.interpolate(r, size=(s, s), mode="bilinear", align_corners=False)
        q = salt_pepper(x, cfg.noise_prob, gen)
        r = salt_pepper(r, cfg.noise_prob, gen)
        descs, raws = self.model(torch.cat([q, r]))  # per scale (2N, C, h, w)
        fg_w = None
        if cfg.foreground:
            fg_q = torch.where(src[:, None, None, None] >= 0, bank_fg[src.clamp_min(0)], self.model.foreground(raws[0][:n]))
            fg_w = torch.maximum(positive_sampling_weight(fg_q, s), positive_sampling_weight(bank_fg[ref], s))
        pairs = sample_pairs(mask, fg_w, cfg.n_pairs, remote=cfg.foreground, generator=gen)
        loss = cpr_loss(
            [d[:n] for d in descs], [d[n:] for d in descs], [f[:n] for f in raws], [f[n:] for f in raws],
            pairs, s, cfg.m_pos, cfg.m_neg, cfg.power,
        )  # fmt: skip
        self._bank_stale = True
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.model.heads.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    # ------------------------------------------------------------ eval path
    def tile_maps(self, tiles: Tensor) -> Tensor:
        """(N, 3, S, S) float tiles -> (N, 1, S, S) anomaly maps (winners' unblurred map unless cfg.blur_map)."""
        if self._bank_stale or not self.model.bank:
            self._ensure_bank()
        return self.model.tile_maps(tiles)

    def image_score(self, anomaly_map: Tensor) -> Tensor:
        """(B, 1, H, W) native maps -> (B,) top-T sum of the blurred map at the model's input size."""
        s = self.cfg.image_size
        maps = anomaly_map.float()
        if maps.shape[-2:] != (s, s):
            maps = F.interpolate(maps, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        return self.model.image_scores(maps, blurred=self.cfg.blur_map)

