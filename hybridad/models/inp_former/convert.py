"""Official INP-Former checkpoint (`model.pth` of luow23/INP-Former) -> `InpFormerModel` state_dict."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from hybridad.errors import UserError, first_line
from hybridad.run_dir import atomic_write_with
from hybridad.models.inp_former.weights import read_state_dict, to_timm_keys

# official prefix -> ours; the sub-module names below these prefixes are the same in both
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^bottleneck\.0\.", "bottleneck."),
    (r"^aggregation\.0\.", "extractor."),
    (r"^decoder\.(\d+)\.", r"decoder.\1."),
)


def convert_state_dict(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official state_dict (prototype_token, encoder.*, bottleneck.0.*, aggregation.0.*, decoder.i.*).

    The encoder is converted to timm names (class position folded into cls_token for register models).
    Works for any width/depth: nothing is hard-coded to ViT-B.

    Raises:
        ValueError: the dict is not an INP-Former checkpoint, or holds keys this converter does not know.
    """
    if "prototype_token" not in official or not any(k.startswith("decoder.") for k in official):
        raise ValueError("no 'prototype_token'/'decoder.*' keys")
    out: dict[str, Tensor] = {"inp_tokens": official["prototype_token"]}
    encoder = {k: v for k, v in official.items() if k.startswith("encoder.")}
    no_embed_class = "encoder.register_tokens" in encoder
    out.update({f"encoder.{k}": v for k, v in to_timm_keys(encoder, no_embed_class).items()})
    unknown = []
    for key, value in official.items():
        if key == "prototype_token" or key.startswith("encoder."):
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown keys {unknown[:3]}")
    return out


def convert_checkpoint(src: Path, out: Path) -> None:
    """Convert an official checkpoint file and write it atomically to `out` (temp name, then rename).

    Raises:
        UserError: missing or unrecognised source file.
    """
    src, out = Path(src), Path(out)
    if out.is_dir():
        raise UserError(f"convert: --out {out} is a folder; give the weight file to write (e.g. {out}/model.pth)")
    if not src.is_file():
        raise UserError(f"convert inp-former: checkpoint '{src}' not found")
    try:
        official = read_state_dict(src)
        if all(k.startswith("module.") for k in official):
            official = {k[len("module.") :]: v for k, v in official.items()}
        converted = convert_state_dict(official)
    except Exception as err:
        raise UserError(
            f"convert inp-former: '{src}' is not an official INP-Former model.pth "
            f"({first_line(err)}); "
            "expected keys prototype_token, encoder.*, bottleneck.0.*, aggregation.0.*, decoder.<i>.*"
        ) from None
    # temporary file, fsync, rename; removed on failure (a full disk: one line, no abort)
    atomic_write_with(out, lambda f: torch.save(converted, f), defer_write_errors=True)
