"""INP-Former training step time, inference throughput and GPU memory (random-init encoders).

Training step = forward + soft-mining/coherence loss + backward + grad clip 0.1 + StableAdamW step.
Inference = `anomaly_map` on the tiles of a native image, then `untile`; random weights change nothing in the cost.

    python -m bench.bench_inp_former          # CPU: tiny preset, batch 8, 112 px; a 448x224 image as 2x4 tiles
    python -m bench.bench_inp_former --gpu    # CUDA: ViT-L/14 reg4, 448 px, batch 16, bf16 autocast
    python -m bench.bench_inp_former --vs-official   # ours / official, ViT-B/14 reg4 280 px, same weights

`vs_official` times hybridad's model (SDPA attention, multi-tensor StableAdamW) and the official arithmetic
(`bench/inp_former_official.py`: explicit softmax attention, per-parameter optimizer loop) on the same weights,
alternating the two every iteration so that a change of load hits both; it also reports the largest anomaly-map
difference between them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics

import torch
from torch import Tensor

from bench.device_timing import sync as _sync
from bench.device_timing import timed as _timed
from hybridad.models.inp_former.config import InpFormerConfig
from hybridad.models.inp_former.loss import InpFormerLoss
from hybridad.models.inp_former.optim import StableAdamW
from hybridad.models.inp_former.torch_model import InpFormerModel
from hybridad.tile_grid import TileLevel, tile, untile


def suite(gpu: bool = False) -> list[dict]:
    """`python -m bench --only inp_former`: throughput and the comparison with the official code."""
    return run(gpu=gpu) + vs_official(device="cuda" if gpu else "cpu")


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
                model.tile_maps(x)

        infer_tiles()
        tile_s = statistics.median(_timed(infer_tiles, dev, steps))
        image = torch.rand(1, 3, *image_size, device=dev)

        def infer_image() -> None:
            tiles, layout = tile(image, TileLevel(cols=grid[1], rows=grid[0]), out_size=input_size)  # (R*C,3,S,S)
            with autocast():
                maps = model.tile_maps(tiles)  # (R*C,1,S,S)
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


def vs_official(
    encoder: str = "vit_base_patch14_reg4_dinov2",
    input_size: int = 280,
    batch_size: int = 2,
    steps: int = 3,
    device: str = "cpu",
    compile_model: bool = False,
    cfg: InpFormerConfig | None = None,
) -> list[dict]:
    """Training step and per-image inference, ours vs the official arithmetic, same weights: one row each with
    both medians and ours / official (lower is better), plus the max |map difference|."""
    from bench.inp_former_official import OfficialStableAdamW
    from hybridad.models.inp_former.optim import StableAdamW

    dev = torch.device(device)
    cfg = cfg or InpFormerConfig(encoder=encoder, random_encoder=True)  # tests pass a tiny cfg
    torch.manual_seed(0)
    ours = InpFormerModel.from_config(cfg).to(dev)
    official = InpFormerModel.from_config(dataclasses.replace(cfg, fused_attn=False)).to(dev)
    official.load_state_dict(ours.state_dict())
    loss_fn = InpFormerLoss(cfg.coherence_weight, cfg.soft_mining_gamma)
    x = torch.rand(batch_size, 3, input_size, input_size, device=dev, generator=None)
    arms = {}
    for name, model, opt_cls in (("ours", ours, StableAdamW), ("official", official, OfficialStableAdamW)):
        params = model.trainable_parameters()
        opt = opt_cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, amsgrad=True)
        fwd = torch.compile(model) if compile_model and name == "ours" else model

        def train_step(model=model, fwd=fwd, opt=opt, params=params) -> None:
            model.train()
            opt.zero_grad(set_to_none=True)
            loss_fn(fwd(x))["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()

        def infer(model=model) -> Tensor:
            model.eval()
            with torch.inference_mode():
                return model.tile_maps(x[:1])  # (1,1,S,S): one image

        arms[name] = (train_step, infer)
    with torch.inference_mode():
        max_diff = float((arms["ours"][1]() - arms["official"][1]()).abs().max())  # same weights, before training
    times: dict[tuple[str, str], list[float]] = {}
    for phase, idx in (("train_step", 0), ("inference_per_image", 1)):
        for name in arms:  # warm-up
            arms[name][idx]()
        for _ in range(steps):
            for name in arms:  # alternate: a load change hits both arms
                times.setdefault((phase, name), []).extend(_timed(arms[name][idx], dev, 1))
    rows = []
    for phase in ("train_step", "inference_per_image"):
        o, r = statistics.median(times[(phase, "ours")]), statistics.median(times[(phase, "official")])
        rows.append({"name": f"inp_former_{phase}_vs_official", "encoder": ours.encoder_name, "input": input_size,
                     "batch": batch_size if phase == "train_step" else 1, "device": str(dev),
                     "threads": torch.get_num_threads(), "ours_s": round(o, 3), "official_s": round(r, 3),
                     "ours_over_official": round(o / r, 3), "max_map_diff": f"{max_diff:.1e}"})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="ViT-L/14 reg4, 448, batch 16, bf16 on CUDA")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--vs-official", action="store_true", help="ours / official, ViT-B/14 280 px, same weights")
    parser.add_argument("--compile", action="store_true", help="with --vs-official: torch.compile our model")
    args = parser.parse_args()
    if args.vs_official:
        for row in vs_official(steps=args.steps or 3, compile_model=args.compile):
            print(json.dumps(row))
        return
    for row in run(gpu=args.gpu, steps=args.steps):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
