"""Loading DenseNet201 trunk weights from local files (torchvision or timm key names)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from hybridad.errors import UserError, first_line

_DOWNLOAD_HINT = (
    "download torchvision's densenet201-c1103571.pth (or timm `densenet201.tv_in1k`) and set cpr.weights=<file>"
)
# torchvision < 0.4 style: "denselayer1.norm.1.weight" -> "denselayer1.norm1.weight"
_OLD_STYLE = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:1|2))\.(weight|bias|running_mean|running_var)$")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, pickled objects: one line naming the file
        why = first_line(err)
        raise UserError(f"{path}: cannot read weights ({why}); {_DOWNLOAD_HINT}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a state_dict (got {type(obj).__name__}); {_DOWNLOAD_HINT}")
    return obj


def normalise_densenet_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision (old `norm.1` or new `norm1`) / timm / prefixed keys to `features.*` names."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key
        for prefix in ("module.", "model.", "backbone.feature_extractor.backbone.", "trunk."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        m = _OLD_STYLE.match(k)
        if m:
            k = f"{m.group(1)}{m.group(2)}.{m.group(3)}"
        if k.startswith("features."):
            out[k] = value
    return out


def load_trunk_weights(trunk: nn.Module, path: str | Path) -> None:
    """Load DenseNet201 weights into a pruned trunk (`features.*` up to denseblock2); extra keys are ignored.

    Raises:
        UserError: the file is missing, unreadable, or lacks a kept trunk tensor / has a wrong shape.
    """
    path = Path(path) if path else Path("")
    if not str(path) or not path.is_file():
        raise UserError(f"cpr.weights: DenseNet201 weight file '{path}' not found; {_DOWNLOAD_HINT}")
    try:
        state = normalise_densenet_keys(_read_state_dict(path))
    except UserError:
        raise
    except Exception as err:  # corrupt file, pickle etc.
        raise UserError(f"{path}: cannot read weights ({err}); {_DOWNLOAD_HINT}") from None
    own = trunk.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(f"{path}: not a DenseNet201 file ({len(missing)} trunk keys missing, e.g. {missing[0]})")
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if bad:
        raise UserError(f"{path}: shape mismatch for {bad[0]} (is it densenet201?)")
    trunk.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def official_bn_warmup(trunk: nn.Module, size: int, seed: int = 66) -> None:
    """Replicate the official pruning forward: one `randn(2,3,S,S)` batch through the trunk in train mode.

    The official code seeds, builds timm's densenet201 (consuming the RNG for its init), then draws the noise;
    we do the same inside a forked RNG so the global state is untouched, which moves every kept BatchNorm's
    running statistics 10 % toward that batch (spec 10.1). Exact noise parity assumes timm's init consumes the
    RNG as in the official run.
    """
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        timm.create_model("densenet201", pretrained=False)
        noise = torch.randn(2, 3, size, size)
    device = next(trunk.parameters()).device
    was_training = trunk.training
    trunk.train()
    for mod in trunk.modules():  # nn.Module.train is overridden by the trunk wrapper; force BN train mode
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train()
    with torch.no_grad():
        trunk(noise.to(device))
    trunk.train(was_training)
    for mod in trunk.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()


def load_cpr_weights(model: nn.Module, path: str | Path) -> None:
    """Load a converted CPR file (`hybridad convert cpr`): `heads.*` and optionally `trunk.*` keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cpr.checkpoint: '{path}' not found; convert an official file with `hybridad convert cpr`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a state_dict")
    except Exception as err:  # truncated, corrupt, pickled objects: one line naming the file
        why = first_line(err)
        raise UserError(f"cpr.checkpoint: cannot read {path} ({why}); convert the official file again with "
                        "`hybridad convert cpr`") from None
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown or not any(k.startswith("heads.") for k in state):
        raise UserError(f"cpr.checkpoint: {path} is not a converted CPR file (unexpected key {unknown[:1]})")
    bad = [k for k in state if state[k].shape != own[k].shape]
    if bad:
        raise UserError(f"cpr.checkpoint: shape mismatch for {bad[0]} (out_dim or preset differ from the file)")
    model.load_state_dict(state, strict=False)
