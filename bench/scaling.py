"""How the EM step's cost grows with the work: step time and peak memory vs sequence length and batch size.

    python bench/scaling.py                 # SmolLM2-135M: T in 64/128/256 at B=32, B in 8/32/64 at T=128
    python bench/scaling.py --lengths 64,128,256,512 --batches 8,16,32,64
    python bench/scaling.py --smoke         # tiny model, tiny sizes, seconds

Each point times ``ProfileFitter.train_step`` (as in em_step.py: config defaults, one M-step first so the EM
prior is complete) on B users with behaviour windows of exactly T tokens, median of ``--steps`` steps after
``--warmup``. By default every point runs in its own child process so its peak RSS (sampled every 20 ms with
userip.monitor.measure) is its own and not the high-water mark of an earlier, larger point; ``--no-isolate``
runs all points in one process (faster, memory figures then only grow). ``activation_mb`` = peak RSS during
the steps minus RSS just before them (model, table and optimiser state already resident).
Growth exponents are least-squares slopes of log(step time) vs log(T) and log(B): 1 = linear.
Plot: step time and peak RSS for both sweeps, next to the JSON (bench/results/scaling.png).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    FLOP_FORMULA,
    log,
    machine_info,
    median,
    model_shape,
    out_path,
    step_flops,
    synchronizer,
    synthetic_titles,
    write_result,
)

NAME = "scaling"


def token_stream(tokenizer, min_tokens: int) -> list[int]:
    text = " " + "; ".join(synthetic_titles(1682))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    while len(ids) < min_tokens:
        ids = ids + ids
    return ids


def exact_corpus(tokenizer, n_users: int, T: int):
    """Every user 1..n_users gets one window of exactly T behaviour tokens (distinct offsets of one stream)."""
    from userip.profile import Corpus

    stream = token_stream(tokenizer, 4 * T + 1000)
    span = len(stream) - T
    train = {u: [stream[(u * 97) % span : (u * 97) % span + T]] for u in range(1, n_users + 1)}
    act = np.full(n_users + 1, 50, dtype=np.int64)
    act[0] = 0
    return Corpus(train=train, heldout={}, n_users=n_users, activity=act)


def load(a):
    import torch

    from userip.llm import load_llm, tiny_llm

    torch.set_num_threads(a.threads)
    return tiny_llm(seed=0) if a.smoke else load_llm(a.model, device=a.device)


def measure_point(llm, a, B: int, T: int) -> dict:
    import psutil
    import torch

    from userip.monitor import measure
    from userip.profile import ProfileConfig, ProfileFitter

    sync = synchronizer(a.device)
    overrides = {"max_tokens": T, "batch_users": B, "device": a.device}
    if a.micro_batch is not None:
        overrides["micro_batch"] = a.micro_batch
    cfg = ProfileConfig(**overrides)
    n_users = max(a.table_users, B)
    corpus = exact_corpus(llm.tokenizer, n_users, T)
    fitter = ProfileFitter(llm, cfg, corpus)
    fitter.m_step(torch.Generator().manual_seed(0), iters=cfg.kmeans_iters)
    users = torch.arange(1, B + 1)
    rows = [corpus.train[int(u)][0] for u in users]
    gc.collect()
    base_mb = psutil.Process().memory_info().rss / 2**20
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    with measure(interval=0.02) as usage:
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            fitter.train_step(users, rows, update_shared=True)
            sync()
            dt = time.perf_counter() - t0
            if i >= a.warmup:
                times.append(dt)
    P = fitter.scorer.layout.prefix_len
    flops = step_flops(model_shape(llm.model), [P + T] * B, [T] * B)
    step_s = median(times)
    point = {"batch": B, "length": T, "prompt_tokens": P, "step_s": step_s, "times_s": times,
             "tokens_per_s": B * (P + T) / step_s, "behaviour_tokens_per_s": B * T / step_s,
             "us_per_token": 1e6 * step_s / (B * (P + T)), "flops": flops["total"],
             "achieved_tflops": flops["total"] / step_s / 1e12, "peak_rss_mb": usage.peak_rss_mb,
             "base_rss_mb": base_mb, "activation_mb": max(usage.peak_rss_mb - base_mb, 0.0),
             "micro_batch": cfg.micro_batch}
    if a.device.startswith("cuda"):
        point["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return point


def slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def plot(path: Path, by_len: list[dict], by_batch: list[dict], fixed_b: int, fixed_t: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, pts, key, label in ((axes[0], by_len, "length", f"behaviour tokens T (B={fixed_b})"),
                                (axes[1], by_batch, "batch", f"users per step B (T={fixed_t})")):
        x = [p[key] for p in pts]
        ax.plot(x, [p["step_s"] for p in pts], "o-", color="C0", label="step time")
        if len(x) >= 2:  # linear reference through the first point
            ax.plot(x, [pts[0]["step_s"] * v / x[0] for v in x], ":", color="C0", alpha=0.6, label="linear")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(label)
        ax.set_ylabel("EM step time (s)", color="C0")
        ax2 = ax.twinx()
        rss = [p["peak_rss_mb"] / 1024 for p in pts]
        ax2.plot(x, rss, "s--", color="C3", label="peak RSS")
        ax2.set_ylabel("peak RSS (GiB)", color="C3")
        ax2.set_ylim(0, max(rss) * 1.3)
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes, one process: runs in seconds")
    p.add_argument("--out", help=f"result JSON (default bench/results/{NAME}.json; the PNG goes next to it)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", type=ints, default=None, help="T sweep (default 64,128,256)")
    p.add_argument("--batches", type=ints, default=None, help="B sweep (default 8,32,64)")
    p.add_argument("--fixed-batch", type=int, default=None, help="B of the T sweep (default 32)")
    p.add_argument("--fixed-length", type=int, default=None, help="T of the B sweep (default 128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per point (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per point (default 1)")
    p.add_argument("--micro-batch", type=int, default=None, help="override ProfileConfig.micro_batch")
    p.add_argument("--table-users", type=int, default=943, help="rows of the user table (ML-100K: 943)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --smoke)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one child process per point (default; --no-isolate with --smoke)")
    p.add_argument("--point", nargs=2, type=int, metavar=("B", "T"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.threads = a.threads or (1 if a.smoke else 2)
    a.lengths = a.lengths or ([16, 32] if a.smoke else [64, 128, 256])
    a.batches = a.batches or ([2, 4] if a.smoke else [8, 32, 64])
    a.fixed_batch = a.fixed_batch or (2 if a.smoke else 32)
    a.fixed_length = a.fixed_length or (16 if a.smoke else 128)
    a.steps = a.steps or (1 if a.smoke else 3)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.smoke else 1)
    if a.isolate is None:
        a.isolate = not a.smoke
    if a.smoke:
        a.table_users = 40
    return a


def child_args(a) -> list[str]:
    args = ["--model", a.model, "--device", a.device, "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--threads", str(a.threads), "--table-users", str(a.table_users)]
    if a.micro_batch is not None:
        args += ["--micro-batch", str(a.micro_batch)]
    return args + (["--smoke"] if a.smoke else [])


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.point:  # child: one point, JSON on the last stdout line
        llm = load(a)
        print(json.dumps(measure_point(llm, a, *a.point)), flush=True)
        return 0
    t_start = time.perf_counter()
    wanted = [(a.fixed_batch, T) for T in a.lengths] + [(B, a.fixed_length) for B in a.batches]
    unique = list(dict.fromkeys(wanted))
    llm = None if a.isolate else load(a)
    points: dict[tuple[int, int], dict] = {}
    for i, (B, T) in enumerate(unique):
        log(f"[{NAME}] point {i + 1}/{len(unique)}: B={B}, T={T}")
        if a.isolate:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--point", str(B), str(T), *child_args(a)]
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
            if r.returncode != 0:
                raise SystemExit(f"point B={B} T={T} failed (exit {r.returncode})")
            pt = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            pt = measure_point(llm, a, B, T)
        points[(B, T)] = pt
        log(f"[{NAME}]   step {pt['step_s']:.3f} s, {pt['tokens_per_s']:.0f} tok/s, peak RSS "
            f"{pt['peak_rss_mb']:.0f} MB (+{pt['activation_mb']:.0f} MB during steps)")
    by_len = [points[(a.fixed_batch, T)] for T in a.lengths]
    by_batch = [points[(B, a.fixed_length)] for B in a.batches]
    exp_t = slope([p["length"] for p in by_len], [p["step_s"] for p in by_len])
    exp_b = slope([p["batch"] for p in by_batch], [p["step_s"] for p in by_batch])
    json_path = out_path(NAME, a.out)
    png = json_path.with_suffix(".png")
    model_name = "tiny random model" if a.smoke else a.model
    plot(png, by_len, by_batch, a.fixed_batch, a.fixed_length,
         f"EM step scaling: {model_name}, {a.device}, {a.threads} threads")
    result = {
        "name": NAME,
        "points": list(points.values()),
        "by_length": by_len,
        "by_batch": by_batch,
        "exponent_time_vs_length": exp_t,
        "exponent_time_vs_batch": exp_b,
        "max_peak_rss_mb": max(p["peak_rss_mb"] for p in points.values()),
        "plot": str(png),
        "flop_formula": FLOP_FORMULA,
        "wall_s": time.perf_counter() - t_start,
        "machine": machine_info(a.device),
        "config": {"smoke": a.smoke, "model": model_name, "device": a.device, "lengths": a.lengths,
                   "batches": a.batches, "fixed_batch": a.fixed_batch, "fixed_length": a.fixed_length,
                   "steps": a.steps, "warmup": a.warmup, "threads": a.threads, "isolate": a.isolate,
                   "table_users": a.table_users, "micro_batch": a.micro_batch},
    }
    path = write_result(json_path, result)
    lo_t, hi_t, lo_b, hi_b = by_len[0], by_len[-1], by_batch[0], by_batch[-1]
    print(f"{NAME}: T {lo_t['length']}->{hi_t['length']} (B={a.fixed_batch}): {lo_t['step_s']:.2f}->"
          f"{hi_t['step_s']:.2f} s, time ~ T^{exp_t or 0:.2f} | B {lo_b['batch']}->{hi_b['batch']} "
          f"(T={a.fixed_length}): {lo_b['step_s']:.2f}->{hi_b['step_s']:.2f} s, time ~ B^{exp_b or 0:.2f} | "
          f"peak RSS {min(p['peak_rss_mb'] for p in points.values()):.0f}-{result['max_peak_rss_mb']:.0f} MB | "
          f"{path}, {png}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
