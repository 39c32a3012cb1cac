"""The whole MVTec AD 2 run on paper: per category, the winning configuration's work and its estimated GPU time.

For each category (its routed branch and tiling from `experiments/`): training tiles per epoch and in total,
evaluation tiles (validation, test_public, both private splits), the data-feed capacity, the GPU time per tile
and the run's total, next to the winners' 6 h / 110 GB on one RTX 4090.

What is measured here and what is estimated (every estimate is labelled in the table):
- FLOPs per tile: counted exactly by `torch.utils.flop_counter` on our own models, built on the meta device
  (no compute): INP-Former ViT-L/14 reg4 at 448 (training step = forward + loss + backward; the frozen encoder
  runs forward only) and CPR DenseNet201 at 320.
- GPU time per tile: ESTIMATED = FLOPs / (the RTX 4090 peak of the run's `trainer.precision`: 82.6 TFLOP/s
  fp32 for the default `32-true` (the official code has no AMP; no TF32 is switched on), 165.2 dense bf16/fp16
  tensor with fp32 accumulate for `bf16-mixed` / `16-mixed` x an assumed efficiency: 0.45 for the ViT, 0.10
  for DenseNet201). CPR's evaluation counts trunk + heads only,
  not the nearest-neighbour search over its bank. `python -m bench --gpu` measures the models on CUDA instead.
- Peak memory of ViT-L/448 batch 16 (fp32 under `32-true`, a bf16-fp32 range under mixed precision): ESTIMATED = fp32 weights + fp32 grads and 3 StableAdamW(amsgrad)
  states of the trainable part + the tensors autograd saves for backward (counted on the meta device, in bf16:
  the lower bound; fp32 copies of norm/softmax inputs under autocast push it towards the fp32 count, also
  given).
- Data-feed capacity: ESTIMATED from a CPU micro-benchmark of what a worker does per tile once images are
  decoded (crop the tile box from a uint8 image, resize to the input, flip), x 2 workers; PNG decoding is not
  included (the decoded cache pays it once per image). `bench.bench_data` measures the real feed.

    python -m bench.bench_plan
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from bench.bench_disk import MAPS_PER_RUN, NATIVE_WH, WINNERS_DISK_GB, encode_tiff, realistic_map
from hybridad.tile_grid import level_boxes

if TYPE_CHECKING:
    from hybridad.config import RunConfig

TRAIN_IMAGES = {"can": 412, "fabric": 387, "fruit_jelly": 263, "rice": 313, "sheet_metal": 137, "vial": 291,
                "wallplugs": 293, "walnuts": 432}  # fmt: skip
# RTX 4090 dense peaks (NVIDIA Ada whitepaper): fp32 CUDA cores; bf16/fp16 tensor cores with fp32 accumulate
PEAK_TFLOPS = {"32-true": 82.6, "bf16-mixed": 165.2, "16-mixed": 165.2}
EFFICIENCY = 0.45  # assumed fraction of peak reached by a ViT-L training step (model FLOP utilisation)
EFFICIENCY_CNN = 0.10  # assumed for CPR's DenseNet201 (concatenation-heavy, memory-bound at batch 8)
GPU_MEMORY_GB = 24.0
WINNERS_HOURS = 6.0
WORKERS = 2


@contextlib.contextmanager
def _no_trunc_normal_loop() -> Iterator[None]:
    """INP-Former's truncated-normal init loops on data (`.any()`), impossible on meta tensors: skip it."""
    import hybridad.models.inp_former.torch_model as tm

    original = tm.trunc_normal_
    tm.trunc_normal_ = lambda t, **kw: t  # values do not matter for counting
    try:
        yield
    finally:
        tm.trunc_normal_ = original


def inp_former_costs(batch: int = 16, size: int = 448) -> dict:
    """FLOPs per tile (train step, inference) and memory terms of ViT-L/14 reg4 INP-Former, on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from hybridad.models.inp_former.config import InpFormerConfig
    from hybridad.models.inp_former.loss import InpFormerLoss
    from hybridad.models.inp_former.torch_model import InpFormerModel

    cfg = InpFormerConfig(encoder="vit_large_patch14_reg4_dinov2", random_encoder=True)
    with _no_trunc_normal_loop(), torch.device("meta"):
        model = InpFormerModel.from_config(cfg)
    model.train()
    loss_fn = InpFormerLoss(cfg.coherence_weight, cfg.soft_mining_gamma)
    out: dict = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[id(t)] = t.numel() * t.element_size()
            return t

        x = torch.empty(batch, 3, size, size, device="meta", dtype=dtype)
        with FlopCounterMode(display=False) as fc:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn(m(x))["loss"]
            fwd = fc.get_total_flops()
            loss.backward()
        out[f"saved_gb_{str(dtype).split('.')[-1]}"] = sum(saved.values()) / 1e9
        out["train_flops_per_tile"] = fc.get_total_flops() / batch
        out["infer_flops_per_tile"] = fwd / batch
        m.zero_grad(set_to_none=True)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.trainable_parameters())
    out["weights_gb"] = 4 * n_all / 1e9
    out["grads_and_optimizer_gb"] = 4 * n_train * (1 + 3) / 1e9  # grad + exp_avg, exp_avg_sq, max_exp_avg_sq
    out["params_m"], out["trainable_m"] = n_all / 1e6, n_train / 1e6
    return out


def cpr_costs(size: int = 320) -> dict:
    """FLOPs per image of CPR (DenseNet201 trunk + heads) at `size`: training (query + reference forward, heads
    backward) and inference forward, counted on one real CPU image (the trunk is cheap to run once)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hybridad.models.cpr.config import CprConfig
    from hybridad.models.cpr.torch_model import CprModel

    model = CprModel(CprConfig(preset="random", image_size=size)).train()
    x = torch.rand(2, 3, size, size)  # query + its reference
    with FlopCounterMode(display=False) as fc:
        descs, _ = model(x)
        fwd = fc.get_total_flops()
        sum(d.float().square().mean() for d in descs).backward()
    return {"train_flops_per_image": fc.get_total_flops(), "infer_flops_per_image": fwd / 2}


def feed_tiles_per_s(size: int = 448, repeats: int = 20) -> float:
    """ESTIMATE: tiles/s of `WORKERS` workers cropping + resizing + flipping tiles from decoded uint8 images."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2048, 2448, 3), dtype=np.uint8)
    boxes = level_boxes(2048, 2448, _level(2, 2))
    t0 = time.process_time()
    for i in range(repeats):
        y0, x0, y1, x1 = boxes[i % len(boxes)]
        tile = cv2.resize(np.ascontiguousarray(img[y0:y1, x0:x1]), (size, size), interpolation=cv2.INTER_LINEAR)
        tile = np.ascontiguousarray(tile[:, ::-1])
    return WORKERS * repeats / (time.process_time() - t0)


def _level(cols: int, rows: int):  # noqa: ANN202
    from hybridad.tile_grid import TileLevel

    return TileLevel(cols=cols, rows=rows)


def peak_tflops(precision: str) -> float:
    """The RTX 4090 dense peak (TFLOP/s) that training at Lightning `precision` can use."""
    if precision not in PEAK_TFLOPS:
        raise ValueError(f"no peak for trainer.precision={precision}; known: {sorted(PEAK_TFLOPS)}")
    return PEAK_TFLOPS[precision]


Work = tuple[int, int, float, float]  # tiles per epoch, training tiles, ms per training tile, GPU seconds


def _inp_former_work(cfg: RunConfig, tiles_per_epoch: int, eval_tiles: int, costs: dict) -> Work:
    """INP-Former trains on every tile of the training pyramid for `max_epochs` epochs."""
    inp, rate = costs["inp_former"]
    train_tiles = tiles_per_epoch * cfg.trainer.max_epochs
    ms_tile = 1e3 * inp["train_flops_per_tile"] / rate
    seconds = train_tiles * ms_tile / 1e3 + eval_tiles * inp["infer_flops_per_tile"] / rate
    return tiles_per_epoch, train_tiles, ms_tile, seconds


def _cpr_work(cfg: RunConfig, tiles_per_epoch: int, eval_tiles: int, costs: dict) -> Work:
    """CPR trains `max_steps` batches of whole images."""
    cpr, rate = costs["cpr"]
    train_tiles = cfg.trainer.max_steps * cfg.data.batch_size
    ms_tile = 1e3 * cpr["train_flops_per_image"] / rate
    per_epoch = TRAIN_IMAGES[cfg.data.category]
    seconds = train_tiles * ms_tile / 1e3 + eval_tiles * cpr["infer_flops_per_image"] / rate
    return per_epoch, train_tiles, ms_tile, seconds


BRANCH_WORK = {"inp_former": _inp_former_work, "cpr": _cpr_work}  # the cost model of each registered branch


def plan_rows(overrides: list[str] | None = None) -> list[dict]:
    """One row per category plus the total, for the routed configs (+ `overrides`, e.g. a precision)."""
    from hybridad.config import load_config

    inp, cpr = inp_former_costs(), cpr_costs()
    feed = feed_tiles_per_s()
    rows, total_h, total_disk, precisions = [], 0.0, 0.0, set()
    for cat, (w, h) in NATIVE_WH.items():
        cfg = load_config([f"data.category={cat}", *(overrides or [])])
        precision = str(cfg.trainer.precision)
        precisions.add(precision)
        rate, rate_cnn = (peak_tflops(precision) * 1e12 * e for e in (EFFICIENCY, EFFICIENCY_CNN))
        tiling = cfg.data.tiling
        per_image = sum(len(level_boxes(h, w, lv)) for lv in tiling.train_levels)
        eval_tiles = MAPS_PER_RUN[cat] * len(level_boxes(h, w, tiling.test_level))
        if cfg.branch not in BRANCH_WORK:
            raise ValueError(f"bench.plan: no cost model for branch {cfg.branch!r} (add it to BRANCH_WORK)")
        costs = {"inp_former": (inp, rate), "cpr": (cpr, rate_cnn)}
        per_epoch, train_tiles, ms_tile, seconds = BRANCH_WORK[cfg.branch](
            cfg, TRAIN_IMAGES[cat] * per_image, eval_tiles, costs)
        pitch = max(w // (tiling.test_level.cols * 32), 8)
        disk_gb = MAPS_PER_RUN[cat] * len(encode_tiff(realistic_map(w, h, pitch, seed=len(cat)))) / 1e9
        total_h, total_disk = total_h + seconds / 3600, total_disk + disk_gb
        rows.append({
            "category": cat, "branch": cfg.branch, "precision": precision, "input": tiling.input_size,
            "tiles/image": per_image,
            "tiles/epoch": per_epoch, "train tiles": train_tiles, "eval tiles": eval_tiles,
            "feed tiles/s (est.)": round(feed), "GPU tiles/s (est.)": round(1e3 / ms_tile),
            "GPU min (est.)": round(seconds / 60, 1), "maps GB": round(disk_gb, 2),
        })  # fmt: skip
    mem = inp["weights_gb"] + inp["grads_and_optimizer_gb"]
    mixed = precisions != {"32-true"}  # autocast saves bf16 activations, with fp32 copies of some inputs
    mem_lo = mem + (inp["saved_gb_bfloat16"] if mixed else inp["saved_gb_float32"])
    mem_hi = mem + inp["saved_gb_float32"]
    span = f"{mem_lo:.0f}-{mem_hi:.0f}" if mixed else f"{mem_hi:.0f}"
    rows.append({
        "category": "all 8, one 24 GB GPU", "GPU min (est.)": f"{total_h:.1f} h (winners {WINNERS_HOURS:g} h)",
        "maps GB": f"{total_disk:.0f} (winners {WINNERS_DISK_GB:g} in all)",
        "precision": "/".join(sorted(precisions)),
        "eval tiles": f"ViT-L/448 b16 training peak (est.) {span} of {GPU_MEMORY_GB:g} GB",
        "train tiles": f"INP {inp['train_flops_per_tile'] / 1e12:.2f} TFLOP/train tile",
        "tiles/epoch": f"INP {inp['infer_flops_per_tile'] / 1e12:.2f} TFLOP/eval tile",
        "tiles/image": f"CPR {cpr['train_flops_per_image'] / 1e9:.0f} GFLOP/train image",
    })  # fmt: skip
    return rows


def run(overrides: list[str] | None = None) -> list[dict]:
    return plan_rows(overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.precision=bf16-mixed")
    args = parser.parse_args()
    from bench.table import markdown_table

    print(markdown_table(plan_rows(args.overrides)))


if __name__ == "__main__":
    main()
