"""llama.cpp GGUF LoRA adapters: written with gguf-py's names, llama.cpp's q/k row order and scale
semantics (checked by reading the file with gguf.GGUFReader against hand-written expectations), read
back exactly, merged GGUF + GGUF, and the bad inputs refused in one line."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import build_peft_model, make_peft_adapter, peft_deltas, save_peft_model, tiny_llama_folder
from lora_lego import load_adapter, merge, save_adapter
from lora_lego.cli import main
from lora_lego.errors import AdapterFormatError, IncompatibleAdaptersError
from lora_lego.formats.gguf import permute_rows

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.filterwarnings("ignore:.*saved base-layer weight")  # PEFT saves embedding copies

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8  # conftest.LLAMA: hidden 32, 4 heads, 2 kv heads


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("base") / "llama")


def llama_cpp_rows(n_rows: int, heads: int) -> list[int]:
    """Hand-written: llama.cpp's row i of attn_q / attn_k is HF row order[i] (rotary halves interleaved)."""
    head_dim = n_rows // heads
    return [h * head_dim + j * (head_dim // 2) + i for h in range(heads) for i in range(head_dim // 2) for j in (0, 1)]


def reader_tensors(path) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> float32 torch tensor of shape reversed(ne), read by gguf.GGUFReader."""
    out = {}
    for tensor in gguf.GGUFReader(path).tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        out[tensor.name] = torch.from_numpy(tensor.data.copy()).reshape(shape).float()
    return out


def reader_field(path, key):
    return gguf.GGUFReader(path).get_field(key).contents()


def test_rope_identity_behind_the_permutation():
    """HF's rotate_half rotary on q equals llama.cpp's interleaved-pair rotary on the permuted q."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(HEADS * HEAD_DIM, 1, generator=generator)
    theta = torch.rand(HEAD_DIM // 2, generator=generator) * 3
    cos, sin = torch.cat([theta.cos(), theta.cos()]), torch.cat([theta.sin(), theta.sin()])
    heads = q.reshape(HEADS, HEAD_DIM)
    rotate_half = torch.cat([-heads[:, HEAD_DIM // 2:], heads[:, :HEAD_DIM // 2]], dim=1)
    hf = (heads * cos + rotate_half * sin).reshape(-1, 1)
    pairs = permute_rows(q, HEADS).reshape(HEADS, HEAD_DIM // 2, 2)
    x, y = pairs[..., 0], pairs[..., 1]
    interleaved = torch.stack([x * theta.cos() - y * theta.sin(), x * theta.sin() + y * theta.cos()], -1)
    torch.testing.assert_close(permute_rows(hf, HEADS), interleaved.reshape(-1, 1))
    assert torch.equal(permute_rows(permute_rows(q, HEADS), HEADS, inverse=True), q)
    assert torch.equal(permute_rows(q, HEADS)[:, 0], q[llama_cpp_rows(len(q), HEADS), 0])


def test_file_has_llama_cpp_names_shapes_and_scale(tmp_path, base):
    """Read with gguf-py alone: keys, names and shapes as llama.cpp's converter writes them, and
    alpha / rank * lora_b @ lora_a in llama.cpp's layout equals PEFT's delta (q / k rows permuted)."""
    peft_model = build_peft_model("g", target_modules=ALL, r=4, lora_alpha=8, rank_pattern={"v_proj": 2},
                                  alpha_pattern={"o_proj": 3.0}, use_rslora=True)
    folder = save_peft_model(peft_model, tmp_path / "a")
    out = save_adapter(load_adapter(folder), tmp_path / "a.gguf", base_config=base)
    assert reader_field(out, "general.type") == "adapter" and reader_field(out, "adapter.type") == "lora"
    assert reader_field(out, "general.architecture") == "llama"
    alpha = reader_field(out, "adapter.lora.alpha")
    assert alpha == 4.0  # the most common rank
    tensors = reader_tensors(out)
    expected_names = {f"blk.{i}.{n}.weight.lora_{s}" for i in range(2) for s in "ab" for n in
                      ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    expected_names |= {f"{n}.weight.lora_{s}" for n in ("token_embd", "output") for s in "ab"}
    assert set(tensors) == expected_names
    assert tensors["blk.0.attn_q.weight.lora_a"].shape == (4, 32)  # (r, in): ne [in, r]
    assert tensors["blk.0.attn_k.weight.lora_b"].shape == (16, 4)  # (out, r): ne [r, out]
    assert tensors["blk.1.attn_v.weight.lora_a"].shape == (2, 32)
    assert tensors["token_embd.weight.lora_a"].shape == (100, 4)  # transposed: llama.cpp gathers its rows
    deltas = peft_deltas(peft_model)
    for layer in range(2):
        for gguf_name, hf_name, heads in (("attn_q", "self_attn.q_proj", HEADS),
                                          ("attn_k", "self_attn.k_proj", KV_HEADS),
                                          ("attn_v", "self_attn.v_proj", None),
                                          ("attn_output", "self_attn.o_proj", None),
                                          ("ffn_down", "mlp.down_proj", None)):
            a, b = (tensors[f"blk.{layer}.{gguf_name}.weight.lora_{s}"] for s in "ab")
            llama_cpp = alpha / b.shape[1] * (b @ a)  # rank = lora_b ne[0]
            expected = deltas[f"model.layers.{layer}.{hf_name}"]
            if heads is not None:
                expected = expected[llama_cpp_rows(expected.shape[0], heads)]
            torch.testing.assert_close(llama_cpp, expected, rtol=1e-5, atol=1e-6)
    a, b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    torch.testing.assert_close(alpha / b.shape[1] * (a @ b.T), deltas["model.embed_tokens"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(None, 1e-6), ("fp16", 2e-3), ("bf16", 1e-2)])
def test_peft_to_gguf_to_peft_round_trip(tmp_path, base, dtype, tol):
    folder = make_peft_adapter(tmp_path, "a", target_modules=ALL, r=4, lora_alpha=16, rank_pattern={"down_proj": 3})
    original = load_adapter(folder)
    out = save_adapter(original, tmp_path / "a.gguf", base_config=base, dtype=dtype)
    again = save_adapter(load_adapter(out), tmp_path / "back")
    back = load_adapter(again)
    assert set(back.modules) == set(original.modules)
    for module in original:
        error = float((back[module].delta() - original[module].delta()).norm() / original[module].delta().norm())
        assert error < tol, (module, error)
    assert back["model.embed_tokens"].kind == "embedding"


def write_converter_style(path, folder, base_config) -> None:
    """A GGUF adapter as llama.cpp's convert_lora_to_gguf.py writes it: alpha = lora_alpha, raw (unscaled)
    factors, B of q / k permuted, no lora-lego keys (hand-written from its documented behaviour)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(config["lora_alpha"]))
    for key, tensor in sorted(tensors.items()):
        layer, rest = key.split("model.layers.")[1].split(".", 1)
        module, side = rest.rsplit(".lora_", 1)
        if side.startswith("B"):
            heads = {"self_attn.q_proj": HEADS, "self_attn.k_proj": KV_HEADS}.get(module)
            tensor = tensor[llama_cpp_rows(tensor.shape[0], heads)] if heads else tensor
        writer.add_tensor(f"blk.{layer}.{names[module]}.weight.lora_{side[0].lower()}", tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reads_a_converter_file_with_base_config(tmp_path, base):
    peft_model = build_peft_model("c", target_modules=["q_proj", "k_proj", "v_proj"], r=4, lora_alpha=8)
    folder = save_peft_model(peft_model, tmp_path / "c")
    path = tmp_path / "c.gguf"
    write_converter_style(path, folder, base)
    with pytest.raises(AdapterFormatError, match="--base-config"):
        load_adapter(path)
    adapter = load_adapter(path, base_config=base)
    for module, expected in peft_deltas(peft_model).items():
        torch.testing.assert_close(adapter[module].delta(), expected, rtol=1e-5, atol=1e-6)


def test_merging_gguf_adapters_equals_merging_their_peft_sources(tmp_path, base):
    folders = [make_peft_adapter(tmp_path, name, target_modules=["q_proj", "k_proj", "down_proj"], r=4)
               for name in ("x", "y")]
    files = [save_adapter(load_adapter(f), tmp_path / f"{f.name}.gguf", base_config=base) for f in folders]
    assert main(["merge", *map(str, files), "--method", "concat", "-o", str(tmp_path / "m.gguf"), "-q"]) == 0
    merged = load_adapter(tmp_path / "m.gguf")  # no --base-config: our files record the head counts
    expected = merge([load_adapter(f) for f in folders], "concat")
    for module in expected:
        torch.testing.assert_close(merged[module].delta(), expected[module].delta(), rtol=1e-5, atol=1e-6)
    assert main(["merge", *map(str, files), "--rank", "4", "-o", str(tmp_path / "m_peft"), "-q"]) == 0
    assert load_adapter(tmp_path / "m_peft").max_rank == 4


def test_cli_convert_to_gguf_and_inspect(tmp_path, base, capsys):
    folder = make_peft_adapter(tmp_path, "a", target_modules=["q_proj", "v_proj"])
    assert main(["convert", str(folder), "-o", str(tmp_path / "x.bin"), "--format", "gguf"]) == 2  # a .gguf name only
    assert "format gguf writes a single .gguf file, not .bin" in capsys.readouterr().err
    out = tmp_path / "x.gguf"
    assert main(["convert", str(folder), "-o", str(out), "--format", "gguf", "--base-config", str(base)]) == 0
    assert "every delta checked" in capsys.readouterr().out
    assert reader_field(out, "general.type") == "adapter"
    out = out.rename(tmp_path / "x.bin")  # a GGUF file is recognised by its content, whatever its name
    assert main(["inspect", str(out)]) == 0
    assert "gguf" in capsys.readouterr().out


def one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path, base, capsys):
    folder = make_peft_adapter(tmp_path, "a", target_modules=["q_proj"], base_name="not/a/local/folder")
    out = tmp_path / "o.gguf"
    one_line_error(capsys, ["convert", str(folder), "-o", str(out)], "--base-config")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    one_line_error(capsys, ["convert", str(folder), "-o", str(out), "--base-config", str(gpt2)],
                   "GPT2LMHeadModel", "not supported")
    assert not out.exists() and not list(tmp_path.glob(".o.gguf*"))
    tied = tmp_path / "tied"
    tied.mkdir()
    config = json.loads((base / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    head = make_peft_adapter(tmp_path, "head", target_modules=["q_proj", "lm_head"])
    one_line_error(capsys, ["convert", str(head), "-o", str(out), "--base-config", str(tied)], "ties lm_head")
    assert not out.exists()


def write_raw(path, arch="llama", kind="lora", tensors=None, quantize=None):
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", kind)
    writer.add_float32("adapter.lora.alpha", 4.0)
    import numpy as np

    for name, array in (tensors or {"blk.0.attn_v.weight.lora_a": np.ones((4, 32), np.float32),
                                    "blk.0.attn_v.weight.lora_b": np.ones((16, 4), np.float32)}).items():
        if quantize is not None and array.shape[-1] % 32 == 0:  # Q8_0 packs blocks of 32
            writer.add_tensor(name, gguf.quants.quantize(array, quantize), raw_dtype=quantize)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_refusals(tmp_path, base):
    import numpy as np

    with pytest.raises(AdapterFormatError, match="quantized") as refused:
        load_adapter(write_raw(tmp_path / "q.gguf", quantize=gguf.GGMLQuantizationType.Q8_0))
    assert "damaged" not in str(refused.value)  # a file's own refusal, in the user's words, not wrapped as damage
    with pytest.raises(AdapterFormatError, match="expected a LoRA adapter"):
        load_adapter(write_raw(tmp_path / "c.gguf", kind="control_vector"))
    with pytest.raises(AdapterFormatError, match="^adapter '.*n.gguf': GGUF tensor .*not a lora_a / lora_b"):
        load_adapter(write_raw(tmp_path / "n.gguf", tensors={"blk.0.attn_norm.weight": np.ones(32, np.float32)}))
    with pytest.raises(AdapterFormatError, match="not supported"):
        load_adapter(write_raw(tmp_path / "a.gguf", arch="falcon"))
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    config = json.loads((base / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(AdapterFormatError, match="base config for 'qwen2'"):
        load_adapter(write_raw(tmp_path / "l.gguf"), base_config=qwen)
    folder = make_peft_adapter(tmp_path, "a", target_modules=["v_proj"])
    on_qwen = save_adapter(load_adapter(folder), tmp_path / "qw.gguf", base_config=qwen)
    on_llama = save_adapter(load_adapter(folder), tmp_path / "ll.gguf", base_config=base)
    assert reader_field(on_qwen, "general.architecture") == "qwen2"
    with pytest.raises(IncompatibleAdaptersError, match="different architectures"):
        merge([load_adapter(on_qwen), load_adapter(on_llama)], "concat")


def _gguf_with_alpha(tmp_path, base, monkeypatch, alpha_writer):
    """A GGUF adapter whose adapter.lora.alpha is written by `alpha_writer(writer, key)` instead."""
    original = gguf.GGUFWriter.add_float32

    def add_float32(writer, key, value):
        return alpha_writer(writer, key) if key == "adapter.lora.alpha" else original(writer, key, value)
    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_float32", add_float32)
        out = tmp_path / "bad.gguf"
        save_adapter(load_adapter(make_peft_adapter(tmp_path, "a", target_modules=["v_proj"])), out,
                     base_config=base)
    return out


@pytest.mark.parametrize("alpha_writer, got", [
    (lambda w, key: w.add_string(key, "eight"), "got 'eight'"),
    (lambda w, key: gguf.GGUFWriter.add_float64(w, key, -4.0), "got -4.0"),
    (lambda w, key: gguf.GGUFWriter.add_float64(w, key, float("inf")), "got inf"),
    (lambda w, key: w.add_array(key, [1, 2]), "got [1, 2]"),
], ids=["string", "negative", "inf", "array"])
def test_gguf_alpha_of_the_wrong_type_or_sign_is_refused(tmp_path, base, monkeypatch, capsys, alpha_writer, got):
    out = _gguf_with_alpha(tmp_path, base, monkeypatch, alpha_writer)
    with pytest.raises(AdapterFormatError, match="adapter.lora.alpha must be a finite number >= 0; " + re.escape(got)):
        load_adapter(out)
    one_line_error(capsys, ["inspect", str(out)], str(out), "adapter.lora.alpha")


@pytest.mark.parametrize("offset, count", [(8, 2**62), (16, 2**62), (8, 10**6)], ids=["tensors", "kvs", "tensors-1e6"])
def test_gguf_absurd_header_counts_are_refused(tmp_path, base, capsys, offset, count):
    out = tmp_path / "a.gguf"
    save_adapter(load_adapter(make_peft_adapter(tmp_path, "a", target_modules=["v_proj"])), out, base_config=base)
    data = bytearray(out.read_bytes())
    data[offset:offset + 8] = count.to_bytes(8, "little")
    out.write_bytes(bytes(data))
    with pytest.raises(AdapterFormatError, match=rf"the GGUF header claims .*{count}.*more than a file of"):
        load_adapter(out)
    one_line_error(capsys, ["inspect", str(out)], str(out), "GGUF header claims")


def test_gguf_wrongly_typed_architecture_and_garbage_infos_are_refused(tmp_path, base, monkeypatch, capsys):
    original = gguf.GGUFWriter.add_string
    with monkeypatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_string", lambda w, key, value: w.add_uint32(key, 7)
                      if key == "general.architecture" else original(w, key, value))
        out = tmp_path / "arch.gguf"
        save_adapter(load_adapter(make_peft_adapter(tmp_path, "a", target_modules=["v_proj"])), out, base_config=base)
    one_line_error(capsys, ["inspect", str(out)], str(out), "general.architecture must be a string; got 7")
    good = tmp_path / "good.gguf"
    save_adapter(load_adapter(tmp_path / "a"), good, base_config=base)
    data = bytearray(good.read_bytes())
    at = data.index(b"blk.0.attn_v.weight.lora_a") - 8  # the name's length: now far beyond the file
    data[at:at + 8] = (2**40).to_bytes(8, "little")
    good.write_bytes(bytes(data))
    one_line_error(capsys, ["inspect", str(good)], str(good))


def test_one_reading_of_tied_embeddings_for_gguf_and_apply():
    """The GGUF writer's lm_head refusal and `apply`'s tied pair read the flag the same way (issue 31: one rule)."""
    from lora_lego.formats.files import tie_word_embeddings

    assert tie_word_embeddings({"tie_word_embeddings": True}) is True
    assert tie_word_embeddings({"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True}}) is False
    assert tie_word_embeddings({"text_config": {"tie_word_embeddings": True}}) is True  # multimodal configs
    assert tie_word_embeddings({"model_type": "llama"}) is None
