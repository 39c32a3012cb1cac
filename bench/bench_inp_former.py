"""INP-Former training step time, inference throughput and GPU memory (random-init encoders).

Training step = forward + soft-mining/coherence loss + backward + grad clip 0.1 + StableAdamW step.
Inference = `anomaly_map` on the tiles of a native image, then `untile`; random weights change nothing in the cost.

    python -m bench.bench_inp_former          # CPU: tiny preset, batch 8, 112 px; a 448x224 image as 2x4 tiles
    python -m bench.bench_inp_former --gpu    # CUDA: ViT-L/14 reg4, 448 px, batch 16, bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch

from bench.device_timing import sync as _sync
from bench.device_timing import timed as _timed
from hybridad.models.inp_former.config import InpFormerConfig
from hybridad.models.inp_former.loss import InpFormerLoss
from hybridad.models.inp_former.optim import StableAdamW
from hybridad.models.inp_former.torch_model import InpFormerModel
from hybridad.tile_grid import TileLevel, tile, untile


def run(
    gpu: bool = False,
    cfg: InpFormerConfig | None = None,
    input_size: int | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    device: str | None = None,
    bf16: bool | None = None,
    image_size: tuple[int, int] = (224, 448),
    grid: tuple[int, int] = (2, 4),
) -> list[dict]:
    """Measure and return one dict per figure.

    Args:
        gpu: the winning setup (ViT-L/14 reg4, 448, batch 16, bf16) on CUDA; otherwise the tiny preset on CPU.
        cfg, input_size, batch_size, steps, device, bf16: overrides of either setup (tests run `gpu=True` on CPU
            with a tiny cfg).
        image_size: (H, W) of the native image for the images/s figure; grid: its (rows, cols) tiles.
    """
    if gpu:
        cfg = cfg or InpFormerConfig(encoder="vit_large_patch14_reg4_dinov2", random_encoder=True)
        input_size, batch_size = input_size or 448, batch_size or 16
        steps, bf16 = steps or 10, True if bf16 is None else bf16
        dev = torch.device(device or "cuda")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--gpu given but CUDA is not available")
    else:
        cfg = cfg or InpFormerConfig(preset="tiny")
        input_size, batch_size = input_size or 112, batch_size or 8
        steps, bf16 = steps or 5, bool(bf16)
        dev = torch.device(device or "cpu")
    torch.manual_seed(0)
    model = InpFormerModel.from_config(cfg).to(dev).train()
    loss_fn = InpFormerLoss(cfg.coherence_weight, cfg.soft_mining_gamma)
    params = model.trainable_parameters()
    opt = StableAdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, amsgrad=True)
    x = torch.rand(batch_size, 3, input_size, input_size, device=dev)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(x))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    train_step()  # warm-up (allocations, kernels)
    step_s = statistics.median(_timed(train_step, dev, steps))
    train_mem = torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else None
    common = {"device": str(dev), "encoder": model.encoder_name, "depth": len(model.encoder.blocks),
              "input": input_size, "bf16": bf16}  # fmt: skip
    rows: list[dict] = [
        {"name": "inp_former_train_step", **common, "batch": batch_size, "seconds": round(step_s, 4),
         "tiles_per_s": round(batch_size / step_s, 2),
         "peak_reserved_gib": None if train_mem is None else round(train_mem / 2**30, 2)},  # fmt: skip
    ]

    model.eval()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():

        def infer_tiles() -> None:
            with autocast():
                model.anomaly_map(x)

        infer_tiles()
        tile_s = statistics.median(_timed(infer_tiles, dev, steps))
        image = torch.rand(1, 3, *image_size, device=dev)

        def infer_image() -> None:
            tiles, layout = tile(image, TileLevel(cols=grid[1], rows=grid[0]), out_size=input_size)  # (R*C,3,S,S)
            with autocast():
                maps = model.anomaly_map(tiles)  # (R*C,1,S,S)
            untile(maps.float(), layout)  # (1,1,H,W)

        infer_image()
        image_s = statistics.median(_timed(infer_image, dev, steps))
    infer_mem = torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else None
    rows.append(
        {"name": "inp_former_inference_tiles", **common, "batch": batch_size,
         "tiles_per_s": round(batch_size / tile_s, 2),
         "peak_reserved_gib": None if infer_mem is None else round(infer_mem / 2**30, 2)}  # fmt: skip
    )
    rows.append(
        {"name": "inp_former_inference_native_image", **common, "image": list(image_size), "grid": list(grid),
         "seconds": round(image_s, 4), "images_per_s": round(1.0 / image_s, 2)}  # fmt: skip
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="ViT-L/14 reg4, 448, batch 16, bf16 on CUDA")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    for row in run(gpu=args.gpu, steps=args.steps):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
