"""CPR training step time, inference throughput at 320 x 320 and memory-bank bytes per training image
(random-init DenseNet201).

Training step = `Cpr.training_step` (reference lookup, salt-and-pepper noise, trunk + LRB heads on query and
reference, pair sampling, contrastive loss) + backward + AdamW step, batch 8 at 320, as the winners trained.
Throughput = `CprModel.tile_maps` + `image_scores` per image (trunk, LRB, GRB over the bank, windowed NN over K=10
references, foreground weighting), bank already built. Random weights change nothing in the cost.

    python -m bench.bench_cpr            # CPU: batch 1 and 16
    python -m bench.bench_cpr --gpu      # CUDA: batch 1 and 16, bank on the device
    python -m bench.bench_cpr --vs-official   # scoring per image (NN + blur + score) vs the official formula
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from bench.device_timing import sync as _sync
from bench.device_timing import timed
from hybridad.models.cpr.config import CprConfig
from hybridad.models.cpr.torch_model import CprModel


def train_step_row(device: torch.device, size: int = 320, batch: int = 8, steps: int = 2, refs: int = 12) -> dict:
    """Median seconds of one CPR training step (forward, loss, backward, AdamW) on `device`."""
    from hybridad.models.cpr.lightning_model import Cpr
    from hybridad.types import Batch

    torch.manual_seed(0)
    cfg = CprConfig(preset="random", image_size=size, k_nearest=min(10, refs - 1), grb_samples=20_000,
                    feb_samples=20_000, samples_per_image=1024, kmeans_iters=20, kmeans_inits=1)  # fmt: skip
    module = Cpr(cfg).to(device)
    ids = [f"train/good/{i:03d}_regular" for i in range(refs)]
    module.fit_references(torch.randint(0, 256, (refs, 3, size, size), dtype=torch.uint8), ids)
    module.train()
    opt = module.configure_optimizers()
    mask = torch.zeros(batch, 1, size, size, device=device)
    mask[::2, :, size // 4 : size // 3, size // 4 : size // 2] = 1  # cut-paste squares on half the tiles
    data = Batch(image=torch.rand(batch, 3, size, size, device=device), label=(mask.flatten(1).amax(1) > 0).long(),
                 sample_id=ids[:batch], split=["train"] * batch, lighting=["regular"] * batch,
                 mask=mask)  # fmt: skip

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer
            loss = module.training_step(data, 0)
        loss.backward()
        opt.step()

    step()  # warm-up
    times = timed(step, device, steps)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    return {"name": "cpr_train_step", "device": where, "batch": batch, "size": size,
            "seconds": round(statistics.median(times), 3), "images_per_s": round(batch / statistics.median(times), 2)}


def vs_official_rows(images: int = 6, k: int = 10, dim: int = 384, size: int = 320, bank: int = 16,
                     rounds: int = 3) -> list[dict]:
    """Per image (batch 1, as the official loop): windowed NN over K references at both scales, upsampling,
    blur and top-512 score, ours (`CprModel._local_map`, `mirror_blur2d`, `image_scores`) against the official
    formula (`bench/cpr_official.py`) on the same L2-normalised descriptors; arms alternate per image."""
    from bench.cpr_official import official_score
    from hybridad.gaussian import mirror_blur2d
    from hybridad.models.cpr.retrieval import l2_normalise

    g = torch.Generator().manual_seed(0)
    cfg = CprConfig(preset="tiny", image_size=size, k_nearest=k)
    model = CprModel(cfg).eval()
    grids = [size // 4, size // 8]  # descriptor grids of the two scales (strides 4 and 8)
    model.bank = [l2_normalise(torch.randn(bank, dim, n, n, generator=g)) for n in grids]  # (N, D, n, n)
    queries = [[l2_normalise(torch.randn(1, dim, n, n, generator=g)) for n in grids] for _ in range(images)]
    refs = [torch.randperm(bank, generator=g)[:k][None] for _ in range(images)]  # (1, K) bank indices

    def ours(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        maps = mirror_blur2d(model._local_map(queries[i], refs[i], (size, size)), cfg.blur_kernel, cfg.blur_sigma)
        return maps, model.image_scores(maps, blurred=True)[0]

    def official(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        per_scale = [b[refs[i][0]] for b in model.bank]  # (K, D, n, n) each
        return official_score([q[0] for q in queries[i]], per_scale, cfg.region_sizes, size, cfg.top_t)

    times: dict[str, list[float]] = {"ours": [], "official": []}
    diff_map = diff_score = 0.0
    with torch.inference_mode():
        ours(0), official(0)  # warm-up
        for _ in range(rounds):
            for i in range(images):
                for name, arm in (("ours", ours), ("official", official)):
                    t0 = time.perf_counter()
                    out = arm(i)
                    times[name].append(time.perf_counter() - t0)
                    if name == "ours":
                        mine = out
                diff_map = max(diff_map, float((mine[0] - out[0]).abs().max()))
                diff_score = max(diff_score, float((mine[1] - out[1]).abs() / out[1].abs()))
    ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
    return [{"name": "cpr_scoring_vs_official", "device": f"cpu x{torch.get_num_threads()} threads",
             "K": k, "size": size, "ours_ms_per_image": round(ms["ours"], 1),
             "official_ms_per_image": round(ms["official"], 1), "speed_up": round(ms["official"] / ms["ours"], 2),
             "max_map_diff": f"{diff_map:.1e}", "max_score_rel_diff": f"{diff_score:.1e}"}]


def suite(gpu: bool = False) -> list[dict]:
    """`python -m bench --only cpr`."""
    return run(gpu=gpu) + ([] if gpu else vs_official_rows())


def run(gpu: bool = False, train_images: int = 16, batches: tuple[int, ...] = (1, 16), size: int = 320) -> list[dict]:
    """Measure and return one dict per figure."""
    device = torch.device("cuda" if gpu else "cpu")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu given but CUDA is not available")
    torch.manual_seed(0)
    cfg = CprConfig(preset="random", image_size=size, k_nearest=10, grb_samples=20_000, feb_samples=20_000,
                    samples_per_image=1024, kmeans_iters=20, kmeans_inits=1)  # fmt: skip
    model = CprModel(cfg).to(device).eval()
    images = torch.rand(train_images, 3, size, size)
    t0 = time.perf_counter()
    model.build_memory_bank(images)
    _sync(device)
    build_s = time.perf_counter() - t0
    n = model.grb.bank.shape[0]
    measured = (sum(t.numel() * t.element_size() for t in model.bank) + model.bank_fg.numel() * model.bank_fg.element_size()
                + model.grb.bank.numel() * model.grb.bank.element_size()) / n  # fmt: skip
    rows: list[dict] = [
        {
            "name": "cpr_bank_bytes_per_train_image",
            "size": size,
            "bytes": int(measured),
            "formula_bytes": model.bank_bytes_per_image(),
            "bank_device": str(model.bank[0].device),
        },
        {"name": "cpr_fit_and_bank_build", "device": str(device), "train_images": n, "seconds": round(build_s, 2)},
    ]
    for batch in batches:
        x = torch.rand(batch, 3, size, size, device=device)
        with torch.inference_mode():
            model.image_scores(model.tile_maps(x))  # warm-up
            _sync(device)
            iters = (20 if batch == 1 else 5) if gpu else (3 if batch == 1 else 1)
            t0 = time.perf_counter()
            for _ in range(iters):
                model.image_scores(model.tile_maps(x))
            _sync(device)
            dt = time.perf_counter() - t0
        rows.append(
            {
                "name": "cpr_inference",
                "device": torch.cuda.get_device_name(device) if gpu else f"cpu x{torch.get_num_threads()} threads",
                "batch": batch,
                "size": size,
                "images_per_s": round(batch * iters / dt, 2),
                "ms_per_image": round(1000 * dt / (batch * iters), 1),
            }
        )
    rows.append(train_step_row(device, size=size))
    if gpu:
        rows.append({"name": "cuda_peak_mib", "value": round(torch.cuda.max_memory_allocated(device) / 2**20)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--train-images", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--vs-official", action="store_true",
                        help="only the scoring path (NN + blur + score per image) against the official formula")
    args = parser.parse_args()
    if args.vs_official:
        for row in vs_official_rows():
            print(json.dumps(row))
        return
    for row in run(args.gpu, args.train_images, tuple(args.batches)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
