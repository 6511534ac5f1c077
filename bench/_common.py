"""Helpers shared by the benchmark scripts: machine description, result files, matmul peak, behaviour data.

Conventions of every script in bench/: progress goes to stderr, exactly one summary line goes to stdout at the
end, and the full result is written to ``bench/results/<name>.json`` (``--out`` overrides the path).
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
D100K = Path("/tmp/d100k")  # a prepared ML-100K dir, used when present (see load_behaviour_data)


def log(msg: str) -> None:
    """Progress line (stderr, so stdout carries only the summary line)."""
    print(msg, file=sys.stderr, flush=True)


def out_path(name: str, out: str | None) -> Path:
    return Path(out) if out else RESULTS / f"{name}.json"


def write_result(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import psutil
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
    }
    try:
        from userip.llm.load import cpu_has_bf16

        info["cpu_bf16"] = cpu_has_bf16()
    except Exception:  # pragma: no cover - informative only
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def synchronizer(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def matmul_peak_tflops(dtype, n: int = 2048, reps: int = 10, device: str = "cpu") -> dict[str, Any]:
    """Achievable matmul peak: median time of an n x n @ n x n product (2 n^3 FLOPs) in ``dtype``."""
    import torch

    sync = synchronizer(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=c)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        times.append(time.perf_counter() - t0)
    t = median(times)
    return {"tflops": 2 * n**3 / t / 1e12, "n": n, "reps": reps, "median_s": t, "dtype": str(dtype)}


# ---------------------------------------------------------------------------------------------- data
_WORDS = [
    "Love", "Night", "Story", "Man", "Woman", "City", "Dark", "Last", "Star", "Wars", "Return", "King", "Queen",
    "Blue", "Red", "House", "Lost", "Time", "Heart", "Dead", "Secret", "River", "Road", "Home", "Life", "Game",
    "Day", "Summer", "Winter", "Fire", "Water", "Dream", "Girl", "Boy", "Angel", "Devil", "Ghost", "Money",
    "Street", "Island", "Sky", "Moon", "Sun", "Killer", "Hunter", "Wild", "Little", "Big", "Great", "American",
    "Paris", "Tokyo", "Murder", "Dance", "Music", "Song", "Family", "Brother", "Sister", "Father", "Mother",
    "Children", "Space", "Alien",
]


def synthetic_titles(n_items: int = 1682, seed: int = 0) -> list[str]:
    """ML-100K-like titles: 1-4 capitalised words and a year, e.g. 'Dark River, The (1994)'."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_items):
        words = " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 5))))
        if rng.random() < 0.15:
            words += ", The"
        out.append(f"{words} ({int(rng.integers(1930, 1999))})")
    return out


def synthetic_windows(n_users: int = 943, windows: int = 5, items_per_window: int = 16, n_items: int = 1682,
                      seed: int = 0) -> dict[int, list[str]]:
    """user_idx (1..n_users) -> behaviour windows: '; '-joined titles, as userip.data renders them."""
    titles = synthetic_titles(n_items, seed)
    rng = np.random.default_rng(seed + 1)
    return {u: ["; ".join(titles[i] for i in rng.integers(0, n_items, items_per_window)) for _ in range(windows)]
            for u in range(1, n_users + 1)}


def load_behaviour_data(data: str | None, smoke: bool):
    """(PreparedData or None, source description). None means: use synthetic windows.

    Order: ``--data DIR``; /tmp/d100k when it is a prepared dir; ``userip.data.prepare(dataset="ml-100k")`` into
    a temp dir (fetched and cached by userip on first use); synthetic ML-100K-like windows if all else fails.
    ``smoke`` always uses synthetic windows (no data, no network).
    """
    if smoke:
        return None, "synthetic"
    from userip.data import load_prepared, prepare

    if data:
        return load_prepared(data), str(data)
    if (D100K / "interactions.parquet").is_file():
        try:
            return load_prepared(D100K), str(D100K)
        except Exception as e:  # a half-written dir from someone else's job: fall through
            log(f"could not read {D100K} ({e}); preparing ML-100K instead")
    try:
        tmp = temp_dir("data")
        log(f"preparing ML-100K into {tmp} (downloaded and cached by userip on first use)")
        return prepare(tmp / "data", dataset="ml-100k"), "ml-100k (prepared)"
    except Exception as e:
        log(f"ML-100K unavailable ({type(e).__name__}: {e}); using synthetic ML-100K-like windows")
        return None, "synthetic"


def temp_dir(tag: str) -> Path:
    """A fresh temp dir, removed when the process exits."""
    d = Path(tempfile.mkdtemp(prefix=f"userip-bench-{tag}-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def write_world(d: Path, n_users: int = 40, n_items: int = 50, seed: int = 0) -> Path:
    """Generic interaction CSVs for a tiny `userip run` (the same world the tests use)."""
    from userip.data.synthetic import write_taste_world

    return write_taste_world(d, n_users=n_users, n_items=n_items, seed=seed)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------------------------- FLOPs
def model_shape(model) -> dict[str, int]:
    """Shape numbers the FLOP count needs, read from a HF causal LM."""
    cfg = model.config
    layers = model.model.layers
    n_linear = sum(p.numel() for p in layers.parameters() if p.dim() == 2)
    return {"layers": int(cfg.num_hidden_layers), "hidden": int(cfg.hidden_size), "vocab": int(cfg.vocab_size),
            "nonembed_params": int(n_linear),
            "total_params": int(sum(p.numel() for p in model.parameters()))}


FLOP_FORMULA = (
    "per row i with S_i = prompt + behaviour tokens (real, no padding) and Y_i = behaviour (target) tokens: "
    "F_lin = 2*N_nonembed*S_i (every decoder matmul; N_nonembed = weights of the decoder layers), "
    "F_attn = 4*n_layers*S_i^2*d (QK^T and PV over the full square), F_head = 2*d*V*Y_i (LM head at the target "
    "positions only). forward = F_lin + F_attn + F_head; backward with frozen weights computes activation "
    "gradients only: F_lin + 2*F_attn + F_head (no weight-gradient matmuls; attention backward has dS and dQ/dK/"
    "dV = 2x its forward). step = forward + backward. Padding, recomputation (checkpointed LM-head chunks), the "
    "naive step's LM head at non-target positions and elementwise ops are not counted: both steps are credited "
    "with the same useful work."
)


def step_flops(shape: dict[str, int], seq_lens: list[int], targets: list[int]) -> dict[str, float]:
    """Useful FLOPs of one forward+backward over rows of ``seq_lens`` tokens scoring ``targets`` tokens."""
    N, L, d, V = shape["nonembed_params"], shape["layers"], shape["hidden"], shape["vocab"]
    S = float(sum(seq_lens))
    S2 = float(sum(s * s for s in seq_lens))
    Y = float(sum(targets))
    f_lin, f_attn, f_head = 2 * N * S, 4 * L * S2 * d, 2 * d * V * Y
    fwd = f_lin + f_attn + f_head
    bwd = f_lin + 2 * f_attn + f_head
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "linear": f_lin, "attention": f_attn,
            "lm_head": f_head}
