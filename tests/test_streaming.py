"""Lazy (module-by-module) loading: the same factors and the same merge as eager loading, read on access."""

import torch
from safetensors.torch import load_file, save_file

import lora_lego as ll
from lora_lego.tensorfile import read_header, read_tensor


def test_tensorfile_reads_what_safetensors_wrote(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.float32),
               "e": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    infos, metadata = read_header(tmp_path / "x.safetensors")
    assert metadata == {"k": "v"} and set(infos) == set(tensors)
    for key, tensor in load_file(tmp_path / "x.safetensors").items():
        assert torch.equal(read_tensor(tmp_path / "x.safetensors", infos[key]), tensor)


def test_lazy_adapter_matches_eager_and_merges_identically(tmp_path):
    folders = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        modules = {f"model.layers.{i}.q_proj": ll.LoraFactors(torch.randn(4, 16, generator=g),
                                                              torch.randn(12, 4, generator=g))
                   for i in range(3)}
        folders.append(ll.save_adapter(ll.Adapter(modules, {"dtype": "bfloat16"}), tmp_path / f"a{seed}"))
    eager = [ll.load_adapter(f) for f in folders]
    lazy = [ll.load_adapter(f, lazy=True) for f in folders]
    assert lazy[0].lazy and not eager[0].lazy
    assert lazy[0].ranks == eager[0].ranks and lazy[0].num_parameters() == eager[0].num_parameters()
    for module in eager[0]:
        assert torch.equal(lazy[0][module].A, eager[0][module].A) and torch.equal(lazy[0][module].B, eager[0][module].B)
    for method in ("lego", "task_arithmetic"):
        left, right = ll.merge(eager, method, rank=4), ll.merge(lazy, method, rank=4)
        for module in left:
            assert torch.equal(left[module].A, right[module].A) and torch.equal(left[module].B, right[module].B)
