"""Official CPR checkpoint -> our keys: every tensor lands where it belongs (heads checked by a hand forward)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridad.errors import UserError
from hybridad.models.cpr.config import CprConfig
from hybridad.models.cpr.convert import TRUNK_PREFIX, convert_checkpoint, convert_state_dict
from hybridad.models.cpr.torch_model import CprModel
from hybridad.models.cpr.weights import load_trunk_weights


def _bn(prefix: str, c: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(c, generator=g) + 0.5,
        f"{prefix}.bias": torch.randn(c, generator=g) * 0.1,
        f"{prefix}.running_mean": torch.randn(c, generator=g) * 0.1,
        f"{prefix}.running_var": torch.rand(c, generator=g) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def official_lrb(cin: tuple[int, int], out: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The spec's section-4 key table, with random values."""
    sd: dict[str, torch.Tensor] = {}
    for h, c in enumerate(cin):
        p = f"lrb.conv.{h}"
        sd[f"{p}.0.weight"] = torch.randn(192, c, 1, 1, generator=g) * 0.05
        sd[f"{p}.0.bias"] = torch.randn(192, generator=g) * 0.1
        sd.update(_bn(f"{p}.1", 192, g))
        for name, (co, ci, k) in {
            "branch0": (64, 192, 1), "branch1.0": (48, 192, 1), "branch1.1": (64, 48, 3),
            "branch2.0": (64, 192, 1), "branch3.1": (64, 192, 1),
        }.items():  # fmt: skip
            sd[f"{p}.3.{name}.conv.weight"] = torch.randn(co, ci, k, k, generator=g) * 0.05
            sd.update(_bn(f"{p}.3.{name}.bn", co, g))
        sd[f"{p}.4.weight"] = torch.randn(out, 256, 1, 1, generator=g) * 0.05
        sd[f"{p}.4.bias"] = torch.randn(out, generator=g) * 0.1
    return sd


def hand_head(x: torch.Tensor, sd: dict[str, torch.Tensor], h: int) -> torch.Tensor:
    """The official LRB head computed straight from the official keys (eval-mode BN)."""
    p = f"lrb.conv.{h}"

    def bn(t: torch.Tensor, q: str, eps: float) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{q}.running_mean"], sd[f"{q}.running_var"], sd[f"{q}.weight"], sd[f"{q}.bias"], eps=eps)

    def basic(t: torch.Tensor, q: str) -> torch.Tensor:
        w = sd[f"{q}.conv.weight"]
        return F.relu(bn(F.conv2d(t, w, padding=w.shape[-1] // 2), f"{q}.bn", 1e-3))

    y = F.relu(bn(F.conv2d(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"]), f"{p}.1", 1e-5))
    pooled = F.avg_pool2d(y, 3, 1, 1, count_include_pad=False)
    y = torch.cat(
        [
            basic(y, f"{p}.3.branch0"),
            basic(basic(y, f"{p}.3.branch1.0"), f"{p}.3.branch1.1"),
            basic(y, f"{p}.3.branch2.0"),
            basic(pooled, f"{p}.3.branch3.1"),
        ],
        1,
    )
    return F.conv2d(y, sd[f"{p}.4.weight"], sd[f"{p}.4.bias"])


def test_lrb_only_checkpoint_maps_every_tensor(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    model = CprModel(CprConfig(preset="tiny", image_size=64, out_dim=16))
    official = official_lrb(model.trunk.channels, 16, g)
    assert sum(k.startswith("lrb.") for k in official) == 78  # spec: 78 LRB keys
    ours = convert_state_dict(official)
    assert len(ours) == 78
    model.load_state_dict(ours, strict=False)
    model.eval()
    for h, c in enumerate(model.trunk.channels):
        x = torch.randn(2, c, 5, 6, generator=g)
        torch.testing.assert_close(model.heads[h](x), hand_head(x, official, h), atol=1e-5, rtol=1e-5)
    # file path: atomic write, then load through cfg.checkpoint
    src, out = tmp_path / "bottle.pth", tmp_path / "out" / "cpr_bottle.pt"
    torch.save(official, src)
    convert_checkpoint(src, out)
    assert out.is_file() and not list(out.parent.glob(".*tmp*"))
    again = CprModel(CprConfig(preset="tiny", image_size=64, out_dim=16, checkpoint=str(out))).eval()
    x = torch.randn(1, model.trunk.channels[1], 4, 4, generator=g)
    torch.testing.assert_close(again.heads[1](x), hand_head(x, official, 1), atol=1e-5, rtol=1e-5)


def test_full_densenet201_checkpoint_keeps_trunk_and_bn_buffers() -> None:
    g = torch.Generator().manual_seed(1)
    ref = CprModel(CprConfig(preset="random", out_dim=384))
    trunk_sd = {TRUNK_PREFIX + k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1
                for k, v in ref.trunk.state_dict().items()}  # fmt: skip
    assert len(trunk_sd) == 228  # spec section 4: 228 backbone keys
    official = {**trunk_sd, **official_lrb((256, 512), 384, g)}
    assert len(official) == 306
    ours = convert_state_dict(official)
    missing, unexpected = ref.load_state_dict(ours, strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith(("grb.", "foreground."))]
    own = ref.state_dict()
    for key, value in official.items():
        if key.startswith(TRUNK_PREFIX):
            assert torch.equal(own["trunk." + key[len(TRUNK_PREFIX) :]], value)  # BN running stats included
    assert int(own["trunk.features.norm0.num_batches_tracked"]) == int(official[TRUNK_PREFIX + "features.norm0.num_batches_tracked"])


def test_convert_rejects_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no 'lrb.conv"):
        convert_state_dict({"features.conv0.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="not found"):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "x.pt")


def test_load_trunk_weights_torchvision_old_and_new_keys(tmp_path: Path) -> None:
    src = CprModel(CprConfig(preset="tiny", image_size=64))
    g = torch.Generator().manual_seed(2)
    new_style = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in src.trunk.state_dict().items()}
    new_style["classifier.weight"] = torch.zeros(3, 3)  # extra keys are ignored
    # torchvision's pre-0.4 names: denselayer1.norm.1.weight instead of denselayer1.norm1.weight
    old_style = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in new_style.items()}
    assert any(".norm.1." in k for k in old_style)
    for i, sd in enumerate((new_style, old_style)):
        path = tmp_path / f"w{i}.pth"
        torch.save(sd, path)
        dst = CprModel(CprConfig(preset="tiny", image_size=64))
        load_trunk_weights(dst.trunk, path)
        for k, v in dst.trunk.state_dict().items():
            if v.is_floating_point():
                assert torch.equal(v, new_style[k]), k
    with pytest.raises(UserError, match="densenet201-c1103571"):
        load_trunk_weights(dst.trunk, tmp_path / "nope.pth")
    with pytest.raises(UserError, match="cpr.weights"):
        CprModel(CprConfig(preset="", weights=str(tmp_path / "nope.pth")))


def test_official_bn_warmup_moves_running_stats_once() -> None:
    from hybridad.models.cpr.weights import official_bn_warmup

    a, b = (CprModel(CprConfig(preset="tiny", image_size=32)) for _ in range(2))
    b.load_state_dict(a.state_dict())
    before = a.trunk.features.norm0.running_var.clone()
    for m in (a, b):
        official_bn_warmup(m.trunk, 32, seed=66)
    assert int(a.trunk.features.norm0.num_batches_tracked) == 1
    assert not torch.equal(a.trunk.features.norm0.running_var, before)
    # running_var: 0.9 * 1 (fresh BN) + 0.1 * unbiased batch variance of the noise-driven activations > 0
    assert torch.all(a.trunk.features.norm0.running_var > 0.9)
    assert all(torch.equal(x, y) for x, y in zip(a.trunk.state_dict().values(), b.trunk.state_dict().values()))
    assert not a.trunk.training and not any(m.training for m in a.trunk.modules())
    state = torch.random.get_rng_state()
    official_bn_warmup(a.trunk, 32, seed=66)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
