"""Convert official CPR checkpoints (flyinghu123/CPR `model.state_dict()`, full or LRB-only) to our key names.

Official -> ours (spec section 4), head h in {0 (stride 4), 1 (stride 8)}:
  backbone.feature_extractor.backbone.features.*  -> trunk.features.*   (BN buffers kept: spec 10.1)
  lrb.conv.h.0.*                 -> heads.h.reduce.*     lrb.conv.h.1.*            -> heads.h.bn.*
  lrb.conv.h.3.branch0.*         -> heads.h.mixed.b0.*   lrb.conv.h.3.branch1.0.*  -> heads.h.mixed.b1a.*
  lrb.conv.h.3.branch1.1.*       -> heads.h.mixed.b1b.*  lrb.conv.h.3.branch2.0.*  -> heads.h.mixed.b2.*
  lrb.conv.h.3.branch3.1.*       -> heads.h.mixed.b3.*   lrb.conv.h.4.*            -> heads.h.proj.*
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from hybridad.errors import UserError, first_line
from hybridad.run_dir import atomic_write_with

TRUNK_PREFIX = "backbone.feature_extractor.backbone."
_LRB = re.compile(r"^lrb\.conv\.(\d)\.(.+)$")
_HEAD_MAP = (  # official sub-path prefix -> our sub-path prefix (longest first)
    ("3.branch1.0.", "mixed.b1a."),
    ("3.branch1.1.", "mixed.b1b."),
    ("3.branch2.0.", "mixed.b2."),
    ("3.branch3.1.", "mixed.b3."),
    ("3.branch0.", "mixed.b0."),
    ("0.", "reduce."),
    ("1.", "bn."),
    ("4.", "proj."),
)


def _map_key(key: str) -> str | None:
    if key.startswith("module."):
        key = key[len("module.") :]
    if key.startswith(TRUNK_PREFIX):
        return "trunk." + key[len(TRUNK_PREFIX) :]
    m = _LRB.match(key)
    if m is None:
        return None
    head, rest = m.groups()
    for old, new in _HEAD_MAP:
        if rest.startswith(old):
            return f"heads.{head}.{new}{rest[len(old):]}"
    return None


def convert_state_dict(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official CPR state_dict -> `CprModel` keys (`trunk.*` when present, `heads.*`).

    Raises:
        UserError: no LRB key found, or a key that looks like CPR but has no mapping.
    """
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in official.items():
        new = _map_key(key)
        if new is None:
            if key.startswith(("lrb.", "backbone.", "module.")):
                unmapped.append(key)
            continue
        out[new] = value.clone()
    if unmapped:
        raise UserError(f"CPR checkpoint has keys without a mapping, e.g. '{unmapped[0]}'")
    if not any(k.startswith("heads.") for k in out):
        raise UserError("not an official CPR checkpoint: no 'lrb.conv.*' keys found")
    return out


def convert_checkpoint(src: Path, out: Path) -> None:
    """Read an official CPR `.pth`, convert it and write our weight file atomically (tmp file + rename)."""
    src, out = Path(src), Path(out)
    if out.is_dir():
        raise UserError(f"convert: --out {out} is a folder; give the weight file to write (e.g. {out}/model.pth)")
    if not src.is_file():
        raise UserError(f"{src}: checkpoint not found")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{src}: cannot read checkpoint ({first_line(err)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{src}: not a state_dict")
    state = convert_state_dict(obj)
    # temporary file, fsync, rename; removed on failure (a full disk: one line, no abort)
    atomic_write_with(out, lambda f: torch.save(state, f), defer_write_errors=True)
