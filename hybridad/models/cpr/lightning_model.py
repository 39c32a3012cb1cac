"""CPR training system: reference store, pair sampling, contrastive loss, memory-bank life cycle."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridad.errors import UserError
from hybridad.image_scores import ImageScoreRule
from hybridad.models.anomaly_module import AnomalyModule
from hybridad.models.cpr.config import CprConfig
from hybridad.models.cpr.foreground import positive_sampling_weight
from hybridad.models.cpr.loss import cpr_loss, perlin_anomalies, salt_pepper, sample_pairs
from hybridad.models.cpr.torch_model import CprModel
from hybridad.postprocess import PostProcessConfig
from hybridad.training_seed import micro_batch_seed, trainer_micro_batch
from hybridad.types import Batch


def reference_key(sample_id: str, box: tuple[int, int, int, int] | None) -> str:
    """Key of a reference tile in the store: the sample id, plus the native tile box when there is one."""
    return sample_id if box is None else f"{sample_id}@{','.join(str(v) for v in box)}"


class Cpr(AnomalyModule):
    """CPR branch. Only the two LRB heads are trained; GRB/FEB are fitted in closed form before training.

    Reference store: the training tiles at `cfg.image_size`, uint8 on the CPU, keyed by `reference_key(sample id,
    tile box)`. It is filled by `fit_references(images, keys)` or, at fit/eval start when empty, by
    `fit_references_from(datamodule)`: every tile of the training pyramid cut from the whole, un-augmented training
    images (`datamodule.reference_tiles()`). A training query finds its clean reference through its sample id and
    tile box (`batch.sample_id`, `batch.tile_box`): one of its source tile's K global neighbours (self excluded). Queries with an unknown id retrieve their
    neighbours from their own histogram, dropping the best match. Positives assume query and reference are aligned,
    i.e. whole-image tiles (as for fruit_jelly and vial).

    The memory bank is rebuilt from the store after fitting and before validate/test/predict when stale.

    Args:
        cfg: CPR settings.
        postprocess: map smoothing / mask post-processing (shared eval path).
    """

    def __init__(self, cfg: CprConfig | dict[str, Any] | None = None,
                 postprocess: PostProcessConfig | dict[str, Any] | None = None) -> None:
        pp = PostProcessConfig(**postprocess) if isinstance(postprocess, dict) else postprocess
        super().__init__(postprocess=pp)  # image score: CPR's own top-T sum (`image_score_rule`)
        self.cfg = CprConfig(**cfg) if isinstance(cfg, dict) else (cfg or CprConfig())
        # plain dicts, so checkpoints (last.ckpt for resume included) load with torch.load(weights_only=True)
        self.save_hyperparameters({"cfg": asdict(self.cfg), "postprocess": asdict(self.postprocess)})
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

    def fit_references_from(self, datamodule: Any) -> None:
        """Fit the store from every training tile of the whole, un-augmented training images
        (`datamodule.reference_tiles()`), keyed by `reference_key(sample id, tile box)`."""
        s = self.cfg.image_size
        images, keys = [], []
        for sample_id, box, crop in datamodule.reference_tiles():  # crop: (3,h,w) uint8
            img = F.interpolate(crop[None].float(), size=(s, s), mode="bilinear", align_corners=False,
                                antialias=False)
            images.append(img.round().clamp(0, 255).to(torch.uint8))  # (1,3,S,S)
            keys.append(reference_key(sample_id, box))
        if not images:
            raise UserError("CPR needs training images: the train split is empty")
        self.fit_references(torch.cat(images), keys)

    def _references_from_datamodule(self) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "reference_tiles"):
            raise UserError("CPR needs its training images: call Cpr.fit_references(images) or use a DataModule")
        self.fit_references_from(dm)

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
    def _reference_for(self, x: Tensor, sample_ids: list[str], gen: torch.Generator,
                       boxes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Query indices in the store (-1 unknown) and the chosen reference index per query, both (N,).

        A query is found by `reference_key(sample id, tile box)` (`boxes`: (N,4) native boxes, or None)."""
        n, k = x.shape[0], self.cfg.k_nearest
        box_list = [tuple(int(v) for v in b) for b in boxes.tolist()] if boxes is not None else [None] * n
        ids = [reference_key(i, b) for i, b in zip(sample_ids, box_list)] if len(sample_ids) == n else [""] * n
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

    def _step_generator(self) -> torch.Generator:
        """A generator seeded from (cpr.seed, micro-batch index, rank) (`hybridad.training_seed`); micro-batch 0
        outside a Trainer."""
        index = trainer_micro_batch(self._trainer) if self._trainer is not None else 0
        seed = micro_batch_seed(self.cfg.seed, index, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        cfg = self.cfg
        x = batch.image.float()  # (N, 3, S, S) in [0, 1]
        n, s = x.shape[0], x.shape[-1]
        mask = batch.mask if batch.mask is not None else x.new_zeros(n, 1, s, s)
        gen = self._step_generator()  # reference pick, perlin, noise and pairs of this micro-batch
        assert self._ref_images is not None and self.model.bank_fg is not None
        src, ref = self._reference_for(x, list(batch.sample_id), gen, batch.tile_box)
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
    def tile_maps(self, tiles: Tensor, native_size: tuple[int, int] | None = None) -> Tensor:
        """(N, 3, S, S) float tiles -> (N, 1, S, S) anomaly maps (winners' unblurred map unless cfg.blur_map);
        `untile` resizes them to the native boxes (`native_size` is not used)."""
        if self._bank_stale or not self.model.bank:
            self._ensure_bank()
        return self.model.tile_maps(tiles)

    def image_score_rule(self) -> ImageScoreRule:
        """CPR's image score: top-T sum of the blurred map at the model's input size."""
        c = self.cfg
        return ImageScoreRule("blurred_top_t_sum", {"size": c.image_size, "top_t": c.top_t,
                                                    "kernel": c.blur_kernel, "sigma": c.blur_sigma,
                                                    "blurred": c.blur_map})
