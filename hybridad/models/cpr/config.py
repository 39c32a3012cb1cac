"""CPR settings (defaults = the official recipe as the VAND 2025 winner ran it on fruit_jelly / vial)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CprConfig:
    """Cascade Patch Retrieval settings (`cpr.<key>=...`).

    Presets: "" = DenseNet201 trunk loaded from `weights` (required); "tiny" = small random-init DenseNet-like
    trunk for tests and the CPU demo; "random" = DenseNet201 with random weights (benchmarks only).
    """

    weights: str = ""  # local DenseNet201 weight file (torchvision or timm keys); required unless preset=tiny
    preset: str = ""  # "tiny": random-init trunk for tests and the CPU demo; "random": random DenseNet201
    checkpoint: str = ""  # optional converted official CPR weights (`hybridad convert cpr`): LRB heads (+ trunk)
    k_nearest: int = 10
    top_t: int = 256  # image score = sum of the top-T pixels of the blurred map (original CPR: 512)
    foreground: bool = True  # FEB + foreground-weighted positives + remote negatives (objects); False = texture
    lr: float = 1e-3
    weight_decay: float = 1e-2

    # model
    image_size: int = 320  # model input; other tile sizes are resized (bilinear, no antialias) to it
    out_dim: int = 384  # LRB descriptor channels
    region_sizes: list[int] = field(default_factory=lambda: [3, 1])  # NN search window per scale (stride 4, 8)
    bn_warmup: bool = True  # replicate the official pruning forward (one noise batch through the trunk's BNs)
    seed: int = 66  # K-means, LDA subsets, BN warm-up noise

    # global retrieval (GRB)
    grb_clusters: int = 12
    grb_grid: int = 5
    grb_keep_ratio: float = 0.8  # keep the floor(25 * 0.8) = 20 smallest block divergences
    grb_samples: int = 50_000  # feature vectors for the codebook K-means
    kmeans_iters: int = 50
    kmeans_inits: int = 3  # official sklearn n_init=10; 3 is enough for 12 centres and much cheaper on CPU

    # foreground (FEB)
    feb_samples: int = 50_000
    feb_border: float = 3 / 80
    feb_center: float = 1 / 5
    feb_max_per_class: int = 15_000
    samples_per_image: int = 2048  # vectors pooled per training image before drawing the K-means samples

    # scoring
    blur_map: bool = False  # False = winners' map (test_new.py, unblurred); True = original CPR blurred map
    blur_kernel: int = 33
    blur_sigma: float = 4.0
    store_dtype: str = "float32"  # reference descriptors: "float32" (official) | "float16" (half the memory)
    bank_budget_bytes: int = 8 * 1024**3  # memory bank stays on the model's device below this, else on the CPU
    match_chunk_bytes: int = 1024**3  # float32 reference descriptors gathered at once while scoring a batch
    eval_chunk: int = 16  # images per forward when building the bank or fitting retrieval

    # training
    synthesis: str = "cut_paste"  # "cut_paste" (DataModule's batch.mask) | "perlin" (original CPR, on device)
    n_pairs: int = 300  # per sample, for each of positives / remote negatives / anomaly pairs
    m_pos: float = 0.8
    m_neg: float = -0.2
    power: float = 3.0
    noise_prob: float = 0.3  # salt-and-pepper noise on query and reference (SNR 0.97-1)
