"""CPR inference throughput at 320 x 320 and memory-bank bytes per training image (random-init DenseNet201).

Throughput = `CprModel.tile_maps` + `image_scores` per image (trunk, LRB, GRB over the bank, windowed NN over K=10
references, foreground weighting), bank already built. Random weights change nothing in the cost.

    python -m bench.bench_cpr            # CPU: batch 1 and 16
    python -m bench.bench_cpr --gpu      # CUDA: batch 1 and 16, bank on the device
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hybridad.models.cpr.config import CprConfig
from hybridad.models.cpr.torch_model import CprModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    if gpu:
        rows.append({"name": "cuda_peak_mib", "value": round(torch.cuda.max_memory_allocated(device) / 2**20)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--train-images", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    args = parser.parse_args()
    for row in run(args.gpu, args.train_images, tuple(args.batches)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
