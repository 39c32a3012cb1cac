"""CPR (Cascade Patch Retrieval) as a plain `nn.Module`: trunk, LRB heads, GRB, FEB, memory bank and scoring.

Input: float tiles in [0, 1], (N, 3, S, S); the model resizes to `cfg.image_size` and applies ImageNet mean/std.
Output of `tile_maps`: (N, 1, S, S) anomaly maps at the input resolution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybridad.errors import UserError
from hybridad.gaussian import mirror_blur2d
from hybridad.image_scores import blurred_top_t_sum
from hybridad.models.cpr.config import CprConfig
from hybridad.models.cpr.foreground import Foreground, seed_regions
from hybridad.models.cpr.retrieval import GlobalRetrieval, l2_normalise, local_nn_distance
from hybridad.models.cpr.weights import load_cpr_weights, load_trunk_weights, official_bn_warmup

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALES = (4, 8)
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class DenseNetTrunk(nn.Module):
    """DenseNet cut after denseblock2; frozen and always in eval mode.

    Returns (denseblock1 output, stride 4; denseblock2 output, stride 8). Keys under `features.` equal
    torchvision / timm densenet names.
    """

    def __init__(self, preset: str = "") -> None:
        super().__init__()
        if preset == "tiny":
            net = timm.models.densenet.DenseNet(growth_rate=8, block_config=(2, 2, 1, 1), bn_size=2)
        else:
            net = timm.create_model("densenet201", pretrained=False)
        self.features = net.features
        for name in ("transition2", "denseblock3", "transition3", "denseblock4", "norm5"):
            delattr(self.features, name)  # pruned like the official trunk
        self.channels = (self._out_channels(self.features.denseblock1), self._out_channels(self.features.denseblock2))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _out_channels(block: nn.Module) -> int:
        layers = list(block.children())
        first_in = layers[0].norm1.num_features
        return first_in + sum(layer.conv2.out_channels for layer in layers)

    def train(self, mode: bool = True) -> DenseNetTrunk:
        return super().train(False)  # BN always uses running statistics

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features
        x = f.pool0(f.norm0(f.conv0(x)))
        f1 = f.denseblock1(x)  # (B, C1, S/4, S/4)
        f2 = f.denseblock2(f.transition1(f1))  # (B, C2, S/8, S/8)
        return f1, f2


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps 1e-3) + ReLU: the Inception-v3 unit."""

    def __init__(self, cin: int, cout: int, kernel: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """Four parallel branches of 64 channels each (192 -> 256)."""

    def __init__(self, cin: int = 192) -> None:
        super().__init__()
        self.b0 = BasicConv2d(cin, 64)
        self.b1a = BasicConv2d(cin, 48)
        self.b1b = BasicConv2d(48, 64, 3)
        self.b2 = BasicConv2d(cin, 64)
        self.b3 = BasicConv2d(cin, 64)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2(x), self.b3(pooled)], 1)  # (B, 256, h, w)


class LocalRetrievalHead(nn.Module):
    """LRB head: 1x1 conv -> BN -> ReLU -> Inception block -> 1x1 conv to `out_dim` (no final activation)."""

    def __init__(self, cin: int, out_dim: int = 384) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, 192, 1)
        self.bn = nn.BatchNorm2d(192)
        self.mixed = InceptionBlock(192)
        self.proj = nn.Conv2d(256, out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.mixed(F.relu(self.bn(self.reduce(x)))))


class CprModel(nn.Module):
    """CPR: frozen DenseNet trunk, two trainable LRB heads, GRB + FEB fitted on the training images.

    Memory bank (plain attributes, not in the state_dict; rebuilt by `build_memory_bank`): per scale the
    L2-normalised descriptors of every training image in `cfg.store_dtype` (float32 as the official code;
    float16 halves the memory and moves the map by ~1e-4), their float32 foreground maps and GRB histograms.
    It lives on the model's device when it fits under `cfg.bank_budget_bytes`, otherwise on the CPU and only the
    K neighbours of each query are moved.
    """

    def __init__(self, cfg: CprConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or CprConfig()
        if cfg.preset not in ("", "tiny", "random"):
            raise UserError(f"cpr.preset: unknown value '{cfg.preset}'; use '', 'tiny' or 'random'")
        if cfg.synthesis not in ("cut_paste", "perlin"):
            raise UserError(f"cpr.synthesis: unknown value '{cfg.synthesis}'; use 'cut_paste' or 'perlin'")
        if cfg.store_dtype not in STORE_DTYPES:
            raise UserError(f"cpr.store_dtype: unknown value '{cfg.store_dtype}'; use 'float32' or 'float16'")
        self.store_dtype = STORE_DTYPES[cfg.store_dtype]
        self.trunk = DenseNetTrunk(cfg.preset)
        if cfg.preset == "":
            load_trunk_weights(self.trunk, cfg.weights)
            if cfg.bn_warmup:
                official_bn_warmup(self.trunk, cfg.image_size, cfg.seed)
        self.heads = nn.ModuleList([LocalRetrievalHead(c, cfg.out_dim) for c in self.trunk.channels])
        self.grb = GlobalRetrieval(self.trunk.channels[0], cfg.grb_clusters, cfg.grb_grid, cfg.grb_keep_ratio)
        self.foreground = Foreground(self.trunk.channels[0], cfg.foreground)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if cfg.checkpoint:
            load_cpr_weights(self, cfg.checkpoint)
        self.bank: list[Tensor] = []  # per scale (N, D, h_s, w_s) in store_dtype, L2-normalised
        self.bank_fg: Tensor | None = None  # (N, 1, h_1, w_1) float32 foreground maps of the training images
        self.train_neighbours: Tensor | None = None  # (N, K) GRB neighbours of each training image (self excluded)

    # ---------------------------------------------------------------- features
    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 or float [0, 1] -> (B, 3, S, S) normalised at `cfg.image_size`."""
        x = x.to(self.device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Training forward: (LRB descriptors per scale, raw trunk features per scale) for float tiles."""
        feats = list(self.trunk(self.preprocess(x)))
        return [head(f) for head, f in zip(self.heads, feats)], feats

    def train(self, mode: bool = True) -> CprModel:
        super().train(mode)
        self.trunk.train(False)
        return self

    def _chunks(self, images: Tensor | Iterable[Tensor]) -> Iterator[Tensor]:
        if isinstance(images, Tensor):
            yield from images.split(self.cfg.eval_chunk)
        else:
            yield from images

    # ---------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit_retrieval(self, images: Tensor | Iterable[Tensor]) -> None:
        """Fit the GRB codebook and the FEB on the training images (two trunk passes; `images` re-iterable).

        Sets the GRB histograms, the training foreground maps and `train_neighbours` (self excluded).
        Sampling: `samples_per_image` random cells per image are pooled, then `grb_samples` / `feb_samples`
        are drawn from the pool (the official code draws from all cells at once; same distribution).
        """
        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        pool, bg_pool, fg_pool = [], [], []
        band = centre = None
        for chunk in self._chunks(images):
            f1, _ = self.trunk(self.preprocess(chunk))  # (B, C, h, w)
            b, c, h, w = f1.shape
            if band is None:
                band, centre = (m.to(self.device) for m in seed_regions(h, w, cfg.feb_border, cfg.feb_center))
            cells = f1.flatten(2).transpose(1, 2)  # (B, h*w, C)
            n = min(cfg.samples_per_image, h * w)
            pick = torch.rand(b, h * w, generator=gen, device=self.device).topk(n, 1).indices  # (B, n)
            pool.append(cells.gather(1, pick[..., None].expand(-1, -1, c)).flatten(0, 1).half().cpu())  # (B*n, C)
            if cfg.foreground:
                for region, out in ((band, bg_pool), (centre, fg_pool)):
                    sel = cells[:, region.flatten()]  # (B, R, C)
                    r = sel.shape[1]
                    keep = torch.rand(b, r, generator=gen, device=self.device).topk(min(n, r), 1).indices
                    out.append(sel.gather(1, keep[..., None].expand(-1, -1, c)).flatten(0, 1).half().cpu())
        if not pool:
            raise UserError("CPR: no training images to fit the retrieval on")
        vectors = torch.cat(pool).to(self.device).float()  # (M, C)
        draw = torch.randperm(vectors.shape[0], generator=gen, device=self.device)
        self.grb.fit(vectors[draw[: cfg.grb_samples]], cfg.kmeans_iters, cfg.kmeans_inits, gen)
        if cfg.foreground:
            draw = torch.randperm(vectors.shape[0], generator=gen, device=self.device)
            self.foreground.fit(
                vectors[draw[: cfg.feb_samples]],
                torch.cat(bg_pool).to(self.device).float(),
                torch.cat(fg_pool).to(self.device).float(),
                cfg.feb_max_per_class,
                cfg.kmeans_iters,
                cfg.kmeans_inits,
                gen,
            )
        hists, decisions = [], []
        for chunk in self._chunks(images):
            f1, _ = self.trunk(self.preprocess(chunk))
            hists.append(self.grb.histograms(f1))  # (B, G, C+1)
            decisions.append(self.foreground.decision(f1) if cfg.foreground else f1.new_ones(f1.shape[0], 1, *f1.shape[2:]))
        self.grb.bank = torch.cat(hists)  # (N, G, C+1)
        dec = torch.cat(decisions)  # (N, 1, h, w)
        self.bank_fg = self.foreground.set_range(dec) if cfg.foreground else dec.float()
        n_train = self.grb.bank.shape[0]
        self.train_neighbours = self.grb.neighbours(
            self.grb.bank, cfg.k_nearest, exclude=torch.arange(n_train, device=self.device)
        )  # (N, K)

    @torch.no_grad()
    def build_memory_bank(self, images: Tensor | Iterable[Tensor]) -> None:
        """Cache the training images' descriptors (`store_dtype`), foreground maps and GRB histograms.

        Fits GRB/FEB first when they are not fitted. `images`: (N, 3, S, S) uint8/float tensor or a re-iterable
        of such batches.
        """
        if not bool(self.grb.fitted):
            self.fit_retrieval(images)
        was_training = self.training
        self.eval()
        descs: list[list[Tensor]] = [[] for _ in self.heads]
        hists, fgs = [], []
        for chunk in self._chunks(images):
            feats = self.trunk(self.preprocess(chunk))
            for s, (head, f) in enumerate(zip(self.heads, feats)):
                descs[s].append(l2_normalise(head(f)).to(self.store_dtype).cpu())  # (B, D, h_s, w_s)
            hists.append(self.grb.histograms(feats[0]))
            fgs.append(self.foreground(feats[0]))  # (B, 1, h_1, w_1) float32
        self.train(was_training)
        self.bank = [torch.cat(d) for d in descs]
        nbytes = sum(t.numel() * t.element_size() for t in self.bank)
        if nbytes <= self.cfg.bank_budget_bytes:
            self.bank = [t.to(self.device) for t in self.bank]
        self.grb.bank = torch.cat(hists)
        self.bank_fg = torch.cat(fgs)
        n = self.grb.bank.shape[0]
        self.train_neighbours = self.grb.neighbours(self.grb.bank, self.cfg.k_nearest, torch.arange(n, device=self.device))

    def bank_bytes_per_image(self) -> int:
        """Bytes the memory bank holds per training image (descriptors + foreground map + histogram)."""
        s, d = self.cfg.image_size, self.cfg.out_dim
        desc = sum(d * math.ceil(s / k) ** 2 for k in SCALES) * self.store_dtype.itemsize
        fg = math.ceil(s / 4) ** 2 * 4  # float32
        hist = self.cfg.grb_grid**2 * (self.cfg.grb_clusters + 1) * 4
        return desc + fg + hist

    # ---------------------------------------------------------------- scoring
    def _describe(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """(B, 3, H, W) tiles -> (L2-normalised descriptors (B, D, h_s, w_s) per scale, stride-4 features)."""
        was_training = self.training
        self.eval()
        feats = self.trunk(self.preprocess(x))
        query = [l2_normalise(head(f)) for head, f in zip(self.heads, feats)]
        self.train(was_training)
        return query, feats[0]

    def _local_map(self, query: list[Tensor], references: Tensor, out_size: tuple[int, int]) -> Tensor:
        """Sum over scales of the windowed NN distance to stored references (B, K) -> (B, 1, *out_size)."""
        if not self.bank:
            raise RuntimeError("CPR memory bank is empty: call build_memory_bank(training images) first")
        fine = query[0].shape[-2:]
        dtype = torch.promote_types(query[0].dtype, torch.float32)  # float32 under autocast, float64 if asked
        total = query[0].new_zeros(query[0].shape[0], 1, *fine, dtype=dtype)  # (B, 1, h_1, w_1)
        for s, q in enumerate(query):
            bank, window = self.bank[s], self.cfg.region_sizes[s]
            per_query = references.shape[1] * q[0].numel() * 4  # float32 bytes of one query's references
            step = max(1, self.cfg.match_chunk_bytes // per_query)
            dist = torch.cat(
                [
                    local_nn_distance(q[i : i + step], bank[nb.to(bank.device)].to(self.device), window)
                    for i, nb in zip(range(0, len(q), step), references.split(step))
                ]
            )  # (B, 1, h_s, w_s); refs gathered per chunk of queries: (b, K, D, h_s, w_s)
            total += F.interpolate(dist, size=fine, mode="bilinear", align_corners=False)
        return F.interpolate(total, size=out_size, mode="bilinear", align_corners=False)  # (B, 1, H, W)

    @torch.no_grad()
    def local_retrieval(self, x: Tensor, references: Tensor) -> Tensor:
        """The local retrieval branch alone: tiles scored against given stored training images.

        Args:
            x: (B, 3, H, W) float tiles in [0, 1].
            references: (B, K) long indices into the memory bank (the training images, in store order).
        Returns:
            (B, 1, H, W) sum over the two scales of the windowed nearest-neighbour cosine distance to the
            references, upsampled to the input size; no foreground weighting, no blur.
        """
        query, _ = self._describe(x)
        return self._local_map(query, references.to(self.device), tuple(x.shape[-2:]))

    @torch.no_grad()
    def tile_maps(self, x: Tensor, exclude: Tensor | None = None, references: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) float tiles in [0, 1] -> (B, 1, H, W) anomaly maps.

        Args:
            exclude: (B,) long, index of the query in the training set (-1 = not a training image).
            references: (B, K) long indices into the memory bank to use instead of the global retrieval.
        """
        if not self.bank:
            raise RuntimeError("CPR memory bank is empty: call build_memory_bank(training images) first")
        cfg = self.cfg
        out_size = tuple(x.shape[-2:])
        query, f1 = self._describe(x)
        if references is None:
            nbrs = self.grb.neighbours(self.grb.histograms(f1), cfg.k_nearest, exclude)  # (B, K)
        else:
            nbrs = references.to(self.device)
        maps = self._local_map(query, nbrs, out_size)  # (B, 1, H, W)
        if cfg.foreground:
            assert self.bank_fg is not None
            fg_q = self.foreground(f1)  # (B, 1, h, w)
            fg_r = self.bank_fg.to(self.device)[nbrs].squeeze(2).to(fg_q.dtype)  # (B, K, h, w)
            fg = torch.cat([fg_q, fg_r], 1)  # (B, K+1, h, w)
            fg = F.interpolate(fg, size=out_size, mode="bilinear", align_corners=False).amax(1, keepdim=True)
            maps = maps * fg
        if cfg.blur_map:
            maps = mirror_blur2d(maps, cfg.blur_kernel, cfg.blur_sigma)
        return maps

    def image_scores(self, maps: Tensor, blurred: bool | None = None) -> Tensor:
        """(B, 1, H, W) maps -> (B,) CPR's image score (`hybridad.image_scores.blurred_top_t_sum`): the map at
        `cfg.image_size`, blurred unless already, sum of its top-T pixels (CPR / DeSTSeg convention).

        Args:
            blurred: whether `maps` are already blurred; default `cfg.blur_map` (maps from `tile_maps`).
        """
        cfg = self.cfg
        return blurred_top_t_sum(maps, cfg.image_size, cfg.top_t, cfg.blur_kernel, cfg.blur_sigma,
                                 cfg.blur_map if blurred is None else blurred)
