"""Serving targets (vLLM): the rank flag that serves an adapter (its rank kept), refusals with reasons, inspect."""

from __future__ import annotations

import pytest
import torch

from conftest import make_peft_adapter
from lora_lego import load_adapter
from lora_lego.cli import main
from lora_lego.deploy.targets import TargetError, check_loads, config_refusals, fit_rank, get_target, refusals
from lora_lego.types import Adapter, LoraFactors

VLLM = get_target("vllm")


@pytest.mark.parametrize("requested, served", [(1, 1), (2, 8), (8, 8), (9, 16), (20, 32), (300, 320), (512, 512)])
def test_flag_value_is_the_allowed_rank_at_or_above(requested, served):
    assert fit_rank(VLLM, requested) == served


def test_rank_above_the_largest_is_refused_with_the_allowed_set():
    with pytest.raises(TargetError, match="1, 8, 16, 32, 64, 128, 256, 320, 512"):
        fit_rank(VLLM, 513)
    generator = torch.Generator().manual_seed(0)
    big = Adapter({"m": LoraFactors(torch.randn(513, 600, generator=generator),
                                    torch.randn(8, 513, generator=generator))})
    assert any("513" in reason for reason in refusals(big, VLLM))
    conv = Adapter({"m": LoraFactors(torch.ones(2, 18), torch.ones(4, 2), "conv3x3")})
    assert any("conv3x3" in reason for reason in refusals(conv, VLLM))
    with pytest.raises(TargetError, match="does not load in vllm"):
        check_loads(conv, VLLM, "peft")
    assert check_loads(Adapter({"m": LoraFactors(torch.ones(20, 6), torch.ones(4, 20))}), VLLM, "peft") == 32


def test_merge_target_vllm_keeps_the_rank_and_names_the_flag(tmp_path, capsys):
    a = make_peft_adapter(tmp_path, "a", target_modules=["q_proj", "v_proj"], r=12)
    b = make_peft_adapter(tmp_path, "b", target_modules=["q_proj", "v_proj"], r=12)
    assert main(["merge", str(a), str(b), "--method", "task_arithmetic", "--rank", "10", "--target", "vllm",
                 "-o", str(tmp_path / "m"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "rank 10 ->" not in out
    assert "vllm: serve with --max-lora-rank 16 or more (largest module rank 10, padded to 16 by the server); " \
           "the default 16 is enough" in out
    assert load_adapter(tmp_path / "m").max_rank == 10  # the merge asked for, not a rank the server pads to
    assert main(["prune", str(a), "--rank", "3", "--target", "vllm", "-o", str(tmp_path / "p"), "-q"]) == 0
    assert "serve with --max-lora-rank 8 or more" in capsys.readouterr().out
    assert load_adapter(tmp_path / "p").max_rank == 3
    assert main(["merge", str(a), str(b), "--rank", "20", "--target", "vllm", "-o", str(tmp_path / "m20"), "-q"]) == 0
    out = capsys.readouterr().out
    assert load_adapter(tmp_path / "m20").max_rank == 20 and "serve with --max-lora-rank 32 or more" in out


def test_merge_target_vllm_refuses_a_rank_above_its_largest_before_any_work(tmp_path, capsys):
    a = make_peft_adapter(tmp_path, "a", target_modules=["q_proj"])
    assert main(["merge", str(a), "--rank", "600", "--target", "vllm", "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: rank 600 is above what vllm serves") and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_target_refuses_a_file_output_before_any_work(tmp_path, capsys):
    a = make_peft_adapter(tmp_path, "a", target_modules=["q_proj"])
    assert main(["merge", str(a), "--target", "vllm", "-o", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: vllm loads peft adapters") and err.count("\n") == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_inspect_target_says_why_not(tmp_path, capsys):
    ok = make_peft_adapter(tmp_path, "ok", target_modules=["q_proj"], r=4)
    saved = make_peft_adapter(tmp_path, "saved", target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert main(["inspect", "--target", "vllm", str(ok), str(saved)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "loads with --max-lora-rank 8 or more; the default 16 is enough" in lines[0]
    assert "does not load" in lines[1] and "modules_to_save" in lines[1]


@pytest.mark.parametrize("saved, refused", [
    (None, False), ([], False), (["classifier", "score"], False), (["score"], False),
    (["classifier", "lm_head"], True), (["embed_tokens"], True),
])
def test_vllm_accepts_a_classification_heads_modules_to_save_only(saved, refused):
    reasons = config_refusals({"modules_to_save": saved}, VLLM)
    if refused:
        assert reasons == [f"vLLM does not load modules_to_save (full copies of layers) (modules_to_save={saved!r})"]
    else:
        assert reasons == []
