"""The branch registry and the image-score rules: look-ups, one-line errors, import weight, known cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridad.branches import Branch, branch_names, get_branch, register_branch
from hybridad.errors import UserError
from hybridad.image_scores import ImageScoreRule, blurred_top_t_sum, score_with, top_ratio_mean

ROOT = Path(__file__).resolve().parents[2]


def test_builtin_branches_and_unknown_name() -> None:
    assert branch_names()[:2] == ("inp_former", "cpr")
    assert get_branch("cpr").section == "cpr" and get_branch("inp_former").cli_name == "inp-former"
    with pytest.raises(UserError, match=r"^unknown branch 'patchcore'; valid: inp_former, cpr") as err:
        get_branch("patchcore")
    assert "\n" not in str(err.value)


def test_a_second_branch_of_the_same_name_is_refused() -> None:
    cpr = get_branch("cpr")
    assert register_branch(cpr) is cpr  # the same declaration again (a module imported twice) is harmless
    with pytest.raises(ValueError, match="registered already"):
        register_branch(Branch(name="cpr", config_class=object, build=cpr.build, exportable=cpr.exportable))


def test_convert_choices_and_file_keys_come_from_the_registry() -> None:
    from hybridad.cli import build_parser
    from hybridad.config import file_keys

    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "patchcore", "x.pth", "--out", "y.pth"])
    args = build_parser().parse_args(["convert", "inp-former", "x.pth", "--out", "y.pth"])
    assert args.branch == "inp-former"
    assert {"inp_former.weights", "inp_former.checkpoint", "cpr.weights", "cpr.checkpoint",
            "data.cut_paste.defect_dir"} <= set(file_keys())


def test_registry_look_ups_import_no_model_code() -> None:
    code = ("import sys; from hybridad.branches import branch_names; branch_names(); "
            "print(sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_image_score_rules_hand_computed() -> None:
    maps = torch.arange(200.0).view(2, 1, 10, 10)  # image 0: 0..99, image 1: 100..199
    assert top_ratio_mean(maps, 0.03).tolist() == [98.0, 198.0]  # mean of the top ceil(3) pixels
    assert top_ratio_mean(maps, 1e-9).tolist() == [99.0, 199.0]  # at least one pixel
    # already blurred, at its size: the plain top-t sum
    assert blurred_top_t_sum(maps, 10, 2, 33, 4.0, blurred=True).tolist() == [99.0 + 98.0, 199.0 + 198.0]
    # a constant map stays constant under the (normalised) blur: t x constant
    const = torch.full((1, 1, 16, 16), 0.25)
    assert blurred_top_t_sum(const, 16, 4, 5, 1.0, blurred=False).item() == pytest.approx(1.0, abs=1e-6)
    rule = ImageScoreRule("top_ratio_mean", {"top_ratio": 0.03})
    assert rule.to_metadata() == {"rule": "top_ratio_mean", "top_ratio": 0.03}
    assert torch.equal(score_with(maps, rule.to_metadata()), rule(maps))
    with pytest.raises(ValueError, match="unknown image score rule 'median'"):
        score_with(maps, {"rule": "median"})


def test_cpr_module_scores_with_its_declared_rule() -> None:
    from hybridad.models.cpr.config import CprConfig
    from hybridad.models.cpr.lightning_model import Cpr

    module = Cpr(CprConfig(preset="tiny", image_size=32, top_t=5, blur_kernel=5, blur_sigma=1.0))
    meta = module.image_score_rule().to_metadata()
    assert meta == {"rule": "blurred_top_t_sum", "size": 32, "top_t": 5, "kernel": 5, "sigma": 1.0,
                    "blurred": False}
    maps = torch.rand(2, 1, 48, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(module.image_score(maps), score_with(maps, meta))
