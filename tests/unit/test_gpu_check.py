"""`make gpu-check`: one line and exit 0 without CUDA; with `--device cpu --tiny` every section lands in the JSON."""

from __future__ import annotations

import json

import torch

from bench import gpu_check


def test_without_cuda_one_line_and_exit_0(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "g.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [gpu_check.NO_DEVICE]
    assert not out.exists()


def test_tiny_cpu_run_fills_every_section(tmp_path, capsys) -> None:
    out = tmp_path / "g.json"
    assert gpu_check.main(["--out", str(out), "--device", "cpu", "--tiny"]) == 0
    data = json.loads(out.read_text())
    sections = ["inp_former_train_fp32", "inp_former_train_bf16_mixed", "inp_former_vs_official", "cpr_train_step",
                "aupro_gpu", "predict_one_image", "data_feed"]
    for name in sections:
        assert name in data and "error" not in data[name], (name, data.get(name))
    assert data["inp_former_train_fp32"]["bf16"] is False and data["inp_former_train_bf16_mixed"]["bf16"] is True
    assert data["inp_former_train_fp32"]["seconds"] > 0 and data["cpr_train_step"]["seconds"] > 0
    assert data["aupro_gpu"]["maps"] == 3 and data["predict_one_image"]["image"] == [56, 84]
    rows = data["inp_former_vs_official"]
    assert [r["name"] for r in rows] == ["inp_former_train_step_vs_official", "inp_former_inference_per_image_vs_official"]
    assert float(rows[0]["max_map_diff"]) <= 1e-5  # same weights: ours and the official arithmetic agree
    assert "wrote" in capsys.readouterr().out
