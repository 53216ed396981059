"""Hub ids, offline: a cache laid out exactly as huggingface_hub lays it out (models--owner--name/refs/<rev>,
snapshots/<commit>/<file> linked to blobs/<sha256>), HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1. Found,
missing, revision, a file inside a repo vs a folder repo, a local path winning, base models by id."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

import lora_lego as ll
from lora_lego import hub
from lora_lego.cli import main
from lora_lego.errors import AdapterFormatError
from lora_lego.hub import HubId, parse_hub_id
from synthetic import random_adapter

pytest.importorskip("huggingface_hub")


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], *, revision: str = "main") -> str:
    """Lay `files` out as huggingface_hub caches revision `revision` of model repo `repo_id`; returns the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # as huggingface_hub writes it: the bare hash, no newline
    return commit


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def saved(tmp_path: Path, name: str, rank: int, suffix: str = "") -> Path:
    return ll.save_adapter(random_adapter(name, rank, seed=rank), tmp_path / "made" / f"{name}{suffix}")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative ids are never local paths here
    hub._RESOLVED.clear()
    yield cache
    hub._RESOLVED.clear()


def one_line_error(capsys, argv, *fragments):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("text, expected", [
    ("owner/name", HubId("owner/name")),
    ("owner/name@v1.0", HubId("owner/name", "", "v1.0")),
    ("owner/name/style.safetensors", HubId("owner/name", "style.safetensors")),
    ("owner/name/sub/folder@refs/pr/1", HubId("owner/name", "sub/folder", "refs/pr/1")),
    ("Org-1/my_lora.v2", HubId("Org-1/my_lora.v2")),
    ("name", None), ("./owner/name", None), ("../owner/name", None), ("/abs/owner/name", None),
    ("~/owner/name", None), ("owner/name/", None), ("owner//name", None), ("owner/name@", None),
    ("own--er/name", None), ("owner/na..me", None), ("owner/name/../x", None), ("-owner/name", None),
    ("owner\\name", None),
])
def test_what_is_a_hub_id(text, expected):
    assert parse_hub_id(text) == expected


def test_a_cached_folder_repo_loads_by_id(cache, tmp_path, capsys):
    folder = saved(tmp_path, "a", 4)
    commit = cache_repo(cache, "owner/lora", folder_files(folder))
    adapter = ll.load_adapter("owner/lora")
    assert adapter.name == "owner/lora" and adapter.max_rank == 4
    assert adapter.metadata["hub"] == {"repo_id": "owner/lora", "path": "", "revision": "main", "commit": commit}
    assert main(["inspect", "owner/lora"]) == 0
    assert capsys.readouterr().out.startswith("adapter owner/lora\n")


def test_a_merge_of_hub_adapters_records_their_ids(cache, tmp_path, capsys):
    cache_repo(cache, "owner/a", folder_files(saved(tmp_path, "a", 4)))
    cache_repo(cache, "owner/b", folder_files(saved(tmp_path, "b", 2)))
    assert main(["merge", "owner/a", "owner/b", "-o", "merged", "--method", "concat", "-q"]) == 0
    assert ll.load_adapter(tmp_path / "merged").metadata["provenance"]["sources"] == ["owner/a", "owner/b"]
    assert "2 adapter(s) -> merged" in capsys.readouterr().out


def test_a_missing_id_says_what_was_tried(cache, capsys):
    one_line_error(capsys, ["inspect", "owner/nothere"], "local path 'owner/nothere' does not exist",
                   "Hub id owner/nothere: not in the Hugging Face cache", "HF_HUB_OFFLINE is set")
    with pytest.raises(AdapterFormatError, match="not in the Hugging Face cache"):
        ll.load_adapter("owner/nothere")


def test_revisions_by_flag_by_suffix_and_by_commit(cache, tmp_path, capsys):
    cache_repo(cache, "owner/lora", folder_files(saved(tmp_path, "a", 4)))
    v2 = cache_repo(cache, "owner/lora", folder_files(saved(tmp_path, "b", 2)), revision="v2")
    assert ll.load_adapter("owner/lora").max_rank == 4
    assert ll.load_adapter("owner/lora@v2").max_rank == 2
    assert ll.load_adapter("owner/lora", revision="v2").name == "owner/lora@v2"
    assert ll.load_adapter(f"owner/lora@{v2}").max_rank == 2
    assert main(["inspect", "owner/lora", "--revision", "v2"]) == 0
    assert "adapter owner/lora@v2" in capsys.readouterr().out
    one_line_error(capsys, ["inspect", "owner/lora", "--revision", "v3"],
                   "Hub id owner/lora@v3: revision 'v3' not in the cache (cached: main, v2)")


def test_a_file_inside_a_repo_and_a_repo_of_one_file(cache, tmp_path, capsys):
    style = saved(tmp_path, "style", 4, ".safetensors")
    cache_repo(cache, "owner/one", {"style.safetensors": style.read_bytes(), "README.md": b"# a kohya-style LoRA"})
    cache_repo(cache, "owner/two", {"x.safetensors": style.read_bytes(), "y.safetensors": style.read_bytes()})
    by_file = ll.load_adapter("owner/one/style.safetensors")
    assert by_file.name == "owner/one/style.safetensors" and by_file.metadata["format"] == "diffusers"
    only = ll.load_adapter("owner/one")  # the repo's only adapter file
    assert only.name == "owner/one" and only.max_rank == 4 and only.metadata["format"] == "diffusers"
    assert ll.load_adapter("owner/two/y.safetensors").max_rank == 4
    one_line_error(capsys, ["inspect", "owner/two"], "holds 2 adapter files and no adapter_config.json; name one: "
                   "owner/two/x.safetensors, owner/two/y.safetensors")
    one_line_error(capsys, ["inspect", "owner/one/nope.safetensors"],
                   "no nope.safetensors in the cached snapshot")


def test_a_folder_inside_a_repo(cache, tmp_path):
    files = {f"adapters/small/{k}": v for k, v in folder_files(saved(tmp_path, "a", 2)).items()}
    cache_repo(cache, "owner/many", files)
    assert ll.load_adapter("owner/many/adapters/small").max_rank == 2


def test_a_local_path_always_wins(cache, tmp_path):
    cache_repo(cache, "owner/lora", folder_files(saved(tmp_path, "a", 4)))
    ll.save_adapter(random_adapter("local", 2), tmp_path / "owner" / "lora")
    adapter = ll.load_adapter("owner/lora")
    assert adapter.max_rank == 2 and "hub" not in adapter.metadata


def test_without_huggingface_hub_the_error_says_what_to_install(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(AdapterFormatError, match=r"needs huggingface_hub: pip install \"lora-lego\[hub\]\""):
        ll.load_adapter("owner/lora")
    with pytest.raises(AdapterFormatError, match="no such folder|no adapter_config|does not exist"):
        ll.load_adapter("./owner/lora")  # never a Hub id: the reader's own error


def test_base_models_by_id_apply_and_calibrate(cache, tmp_path, capsys):
    pytest.importorskip("transformers")
    from conftest import make_peft_adapter, tiny_llama_folder, write_prompts

    model = tiny_llama_folder(tmp_path / "made" / "model")
    cache_repo(cache, "org/tiny-llama", folder_files(model))
    adapter = make_peft_adapter(tmp_path / "made", "x")
    assert main(["apply", str(adapter), "--base", "org/tiny-llama", "-o", "applied", "-q"]) == 0
    assert (tmp_path / "applied" / "config.json").is_file()
    prompts = write_prompts(tmp_path / "p.jsonl", 3, seed=0)
    assert main(["calibrate", "--model", "org/tiny-llama", "--prompts", str(prompts), "-o", "calib", "-q"]) == 0
    assert ll.load_calibration(tmp_path / "calib").metadata["model"] == "org/tiny-llama"
    capsys.readouterr()
    one_line_error(capsys, ["apply", str(adapter), "--base", "org/other", "-o", "x"],
                   "model 'org/other': local path 'org/other' does not exist; Hub id org/other: not in the")
