"""One EM training step (E-step update of B users, one behaviour window each), next to a naive reference step.

    python bench/em_step.py                  # SmolLM2-135M, B=32, ~110 behaviour tokens per row, 2 threads
    python bench/em_step.py --device cuda --batch 128
    python bench/em_step.py --smoke          # tiny random model, seconds

Ours:  ``ProfileFitter.train_step`` as `userip profile fit` runs it (config defaults: bf16 where the CPU has
       it, eager attention on CPU, profile-aware 4-D mask, LM head + cross-entropy only at behaviour positions
       in checkpointed chunks, micro-batches, row-wise lazy Adam on the touched rows, EM prior with code
       targets: one M-step is run before timing so the prior's code term is live).
Naive: the reference code's way: an fp32 copy of the model, ``model(inputs_embeds=, attention_mask=2-D,
       labels=)`` (full-vocabulary logits and loss at every position, labels -100 off the behaviour), rows
       padded to the batch maximum, default attention implementation (sdpa), and a dense ``torch.optim.Adam``
       over the whole user table [n_users+1, m, n, H].
Naive bf16: the same loop on a bf16 copy of the model (the table and Adam stay fp32, the prompt is cast to
       bf16 on its way in), so the speed-up from our kernels is reported apart from the speed-up of the dtype.

All run the same users and windows, interleaved in the same process (warm-up first, then each first in turn),
and the median of ``--steps`` timed steps is reported. Achieved FLOP/s uses the useful FLOPs of the step
(formula in _common.FLOP_FORMULA, also written to the JSON), against the bf16 and fp32 peak of one large
matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    FLOP_FORMULA,
    load_behaviour_data,
    log,
    machine_info,
    matmul_peak_tflops,
    median,
    model_shape,
    out_path,
    step_flops,
    synchronizer,
    synthetic_windows,
    verdict,
    write_result,
)
from userip.monitor import peak_rss_mb  # noqa: E402

NAME = "em_step"
TARGET_SPEEDUP = 3.0
TARGET_SPEEDUP_BF16 = 2.0  # over the naive loop in bf16: what the kernels add beyond the dtype
TARGET_PEAK_FRACTION = 0.40


# ---------------------------------------------------------------------------------------------- models
def load_models(spec: str, device: str, smoke: bool):
    """(ours, naive, naive_bf16): the LM as userip loads it, and fp32 and bf16 sdpa copies for the reference
    steps."""
    from userip.llm import load_llm, tiny_llm

    if smoke:
        ours = tiny_llm(seed=0)
        naive = tiny_llm(seed=0, dtype=torch.float32)
        naive_bf16 = tiny_llm(seed=0, dtype=torch.bfloat16)
        _set_attn(naive.model, "sdpa")
        _set_attn(naive_bf16.model, "sdpa")
        return ours, naive, naive_bf16
    ours = load_llm(spec, dtype="auto", device=device)
    naive = load_llm(spec, dtype="fp32", device=device, attn_implementation="sdpa")
    naive_bf16 = load_llm(spec, dtype="bf16", device=device, attn_implementation="sdpa")
    return ours, naive, naive_bf16


def _set_attn(model, impl: str) -> None:
    try:
        model.set_attn_implementation(impl)
    except Exception:  # older transformers: the config attribute is what the layers read
        model.config._attn_implementation = impl


# ---------------------------------------------------------------------------------------------- corpus
def build_corpus(llm, cfg, data_arg: str | None, smoke: bool):
    from userip.profile import Corpus
    from userip.profile.api import build_corpus as corpus_from_data

    data, source = load_behaviour_data(data_arg, smoke)
    if data is not None:
        return corpus_from_data(data, llm.tokenizer, cfg), source
    n_users = 40 if smoke else 943
    train = synthetic_windows(n_users=n_users, windows=3)
    held = {u: w[:1] for u, w in train.items()}
    act = np.full(n_users + 1, 50, dtype=np.int64)
    act[0] = 0
    return Corpus.from_text(llm.tokenizer, train, held, n_users, act, cfg.max_tokens), source


def pick_rows(corpus, batch: int, seed: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """``batch`` users (seeded choice among those with the longest windows) and each one's longest window."""
    users = sorted(corpus.train)
    longest = {u: max(corpus.train[u], key=len) for u in users}
    if len(users) < batch:
        raise SystemExit(f"only {len(users)} users have windows, --batch {batch} needs more")
    rng = np.random.default_rng(seed)
    top = sorted(users, key=lambda u: -len(longest[u]))[: max(batch, len(users) // 2)]
    chosen = sorted(int(u) for u in rng.choice(top, size=batch, replace=False))
    return torch.tensor(chosen, dtype=torch.long), [longest[u] for u in chosen]


# ---------------------------------------------------------------------------------------------- naive step
class NaiveStep:
    """The reference implementation's E-step update, kept deliberately plain (see module docstring)."""

    def __init__(self, llm, cfg, n_users: int, device: str, seed: int = 0) -> None:
        from userip.profile.model import SoftPrompt

        self.llm, self.cfg, self.device = llm, cfg, device
        self.prompt = SoftPrompt(llm, cfg)  # the fp32 prompt embeddings: the naive copy is an fp32 model
        self.layout = self.prompt.layout
        m, n, H = len(cfg.profiles), max(p.n_tokens for p in cfg.profiles), llm.hidden_size
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter((torch.rand(n_users + 1, m, n, H, generator=g) * 0.2 - 0.1).to(device))
        self.opt = torch.optim.Adam([self.table], lr=cfg.lr_user)
        tok = llm.tokenizer
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def step(self, users: torch.Tensor, rows: list[list[int]]) -> tuple[float, float]:
        B, P = len(rows), self.layout.prefix_len
        T = max(len(r) for r in rows)
        L = P + T
        beh = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        attn = torch.zeros(B, L, dtype=torch.long)
        for i, r in enumerate(rows):
            beh[i, : len(r)] = torch.tensor(r)
            labels[i, P : P + len(r)] = torch.tensor(r)
            attn[i, : P + len(r)] = 1
        beh, labels, attn = beh.to(self.device), labels.to(self.device), attn.to(self.device)
        theta = self.table[users.to(self.device)]  # [B, m, n, H]
        with torch.no_grad():
            beh_emb = self.llm.input_embeddings()(beh).float()
        x = self.prompt(theta, beh_emb).to(self.llm.dtype)  # a no-op for the fp32 copy
        out = self.llm.model(inputs_embeds=x, attention_mask=attn, labels=labels)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        n_tok = float(sum(len(r) for r in rows))
        return float(out.loss.detach()) * n_tok, n_tok


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny random model and sizes: runs in seconds")
    p.add_argument("--out", help=f"result JSON (default bench/results/{NAME}.json)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 for ours, fp32 and bf16 naive)")
    p.add_argument("--data", help="prepared data dir (default /tmp/d100k if present, else ML-100K, else synthetic)")
    p.add_argument("--batch", type=int, default=None, help="users per step (default 32; 4 with --smoke)")
    p.add_argument("--tokens", type=int, default=None, help="behaviour tokens per row (max_tokens; default 110)")
    p.add_argument("--micro-batch", type=int, default=None, help="override ProfileConfig.micro_batch")
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per method first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --smoke)")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (default 2048; 8192 cuda)")
    p.add_argument("--no-naive", action="store_true", help="time only our step (no speed-up figure)")
    a = p.parse_args(argv)
    a.threads = a.threads or (1 if a.smoke else 2)
    cuda = a.device.startswith("cuda")
    a.batch = a.batch or (4 if a.smoke else 32)
    a.tokens = a.tokens or (24 if a.smoke else 110)
    a.steps = a.steps or (2 if a.smoke else 5)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 2)
    a.peak_n = a.peak_n or (256 if a.smoke else 8192 if cuda else 2048)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    from userip.profile import ProfileConfig, ProfileFitter

    torch.set_num_threads(a.threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    sync = synchronizer(a.device)
    t_setup = time.perf_counter()

    log(f"[{NAME}] matmul peak ({a.peak_n}^3, bf16 and fp32, {a.threads} threads)")
    reps = 3 if a.smoke else 10
    peak_bf16 = matmul_peak_tflops(torch.bfloat16, a.peak_n, reps, a.device)
    peak_fp32 = matmul_peak_tflops(torch.float32, a.peak_n, reps, a.device)
    log(f"[{NAME}] peak bf16 {peak_bf16['tflops']:.3f} TFLOP/s, fp32 {peak_fp32['tflops']:.3f} TFLOP/s")

    log(f"[{NAME}] loading {'tiny model' if a.smoke else a.model} (ours + fp32 and bf16 naive copies)")
    ours_llm, naive_llm, naive_bf16_llm = load_models(a.model, a.device, a.smoke)
    overrides = {"max_tokens": a.tokens, "batch_users": a.batch, "device": a.device}
    if a.micro_batch is not None:
        overrides["micro_batch"] = a.micro_batch
    cfg = ProfileConfig(**overrides)
    corpus, source = build_corpus(ours_llm, cfg, a.data, a.smoke)
    users, rows = pick_rows(corpus, a.batch)
    fitter = ProfileFitter(ours_llm, cfg, corpus)
    fitter.m_step(torch.Generator().manual_seed(0), iters=cfg.kmeans_iters)  # code targets -> full EM prior
    P = fitter.scorer.layout.prefix_len
    seq_lens = [P + len(r) for r in rows]
    targets = [len(r) for r in rows]
    shape = model_shape(ours_llm.model)
    flops = step_flops(shape, seq_lens, targets)
    log(f"[{NAME}] data {source}: B={len(rows)}, behaviour tokens/row mean {np.mean(targets):.1f} "
        f"(max {max(targets)}), prompt {P}, micro_batch {cfg.micro_batch}, dtype {ours_llm.dtype}; "
        f"{flops['total'] / 1e12:.3f} TFLOP useful per step")

    def run_ours() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        s, n = fitter.train_step(users, rows, update_shared=True)
        sync()
        return time.perf_counter() - t0, s, n

    def naive_runner(step: NaiveStep):
        def run() -> tuple[float, float, float]:
            t0 = time.perf_counter()
            s, n = step.step(users, rows)
            sync()
            return time.perf_counter() - t0, s, n
        return run

    runners = {"ours": run_ours}
    if not a.no_naive:
        runners["naive"] = naive_runner(NaiveStep(naive_llm, cfg, corpus.n_users, a.device))
        runners["naive_bf16"] = naive_runner(NaiveStep(naive_bf16_llm, cfg, corpus.n_users, a.device))
    times: dict[str, list[float]] = {"ours": [], "naive": [], "naive_bf16": []}
    nll: dict[str, float] = {}
    setup_s = time.perf_counter() - t_setup
    methods = list(runners)
    for i in range(a.warmup + a.steps):
        order = methods[i % len(methods):] + methods[: i % len(methods)]  # each method first in turn
        for which in order:
            dt, s, n = runners[which]()
            nll[which] = s / max(n, 1.0)
            if i >= a.warmup:
                times[which].append(dt)
            tag = "warm-up" if i < a.warmup else f"step {i - a.warmup + 1}/{a.steps}"
            log(f"[{NAME}] {tag} {which:<10} {dt:8.3f} s  nll/token {nll[which]:.3f}")

    step_s = median(times["ours"])
    naive_s = median(times["naive"]) if times["naive"] else None
    naive_bf16_s = median(times["naive_bf16"]) if times["naive_bf16"] else None
    real_tokens = sum(seq_lens)
    achieved = flops["total"] / step_s / 1e12
    frac_bf16 = achieved / peak_bf16["tflops"]
    frac_fp32 = achieved / peak_fp32["tflops"]
    own_dtype = "bf16" if ours_llm.dtype == torch.bfloat16 else "fp32"
    frac_own = frac_bf16 if own_dtype == "bf16" else frac_fp32
    speedup = naive_s / step_s if naive_s else None
    speedup_bf16 = naive_bf16_s / step_s if naive_bf16_s else None
    result = {
        "name": NAME,
        "step_s": step_s,
        "naive_step_s": naive_s,
        "speedup_vs_naive": speedup,
        "naive_bf16_step_s": naive_bf16_s,
        "speedup_vs_naive_bf16": speedup_bf16,
        "tokens_per_s": real_tokens / step_s,
        "behaviour_tokens_per_s": sum(targets) / step_s,
        "naive_tokens_per_s": real_tokens / naive_s if naive_s else None,
        "achieved_tflops": achieved,
        "naive_achieved_tflops": flops["total"] / naive_s / 1e12 if naive_s else None,
        "fraction_of_bf16_peak": frac_bf16,
        "fraction_of_fp32_peak": frac_fp32,
        "fraction_of_own_dtype_peak": frac_own,
        "naive_fraction_of_fp32_peak": (flops["total"] / naive_s / 1e12 / peak_fp32["tflops"]) if naive_s else None,
        "bf16_peak_tflops": peak_bf16["tflops"],
        "fp32_peak_tflops": peak_fp32["tflops"],
        "targets": {"speedup_vs_naive": TARGET_SPEEDUP, "fraction_of_peak": TARGET_PEAK_FRACTION,
                    "speedup_vs_naive_bf16": TARGET_SPEEDUP_BF16,
                    "speedup_met": bool(speedup is not None and speedup >= TARGET_SPEEDUP),
                    "speedup_bf16_met": bool(speedup_bf16 is not None and speedup_bf16 >= TARGET_SPEEDUP_BF16),
                    "peak_fraction_met": bool(frac_own >= TARGET_PEAK_FRACTION)},
        "times_s": times,
        "nll_per_token_last": nll,
        "flops_per_step": flops,
        "flop_formula": FLOP_FORMULA,
        "model_shape": shape,
        "peaks": {"bf16": peak_bf16, "fp32": peak_fp32},
        "peak_rss_mb": peak_rss_mb(),
        "setup_s": setup_s,
        "machine": machine_info(a.device),
        "config": {
            "smoke": a.smoke, "model": ours_llm.name, "dtype": str(ours_llm.dtype), "naive_dtype": "float32",
            "naive_bf16_dtype": str(naive_bf16_llm.dtype),
            "attention": getattr(ours_llm.model.config, "_attn_implementation", None),
            "naive_attention": getattr(naive_llm.model.config, "_attn_implementation", None),
            "device": a.device, "batch_users": len(rows), "max_tokens": a.tokens,
            "behaviour_tokens_mean": float(np.mean(targets)), "behaviour_tokens_max": max(targets),
            "prompt_tokens": P, "real_tokens_per_step": real_tokens,
            "padded_tokens_naive": len(rows) * (P + max(targets)), "micro_batch": cfg.micro_batch,
            "ce_chunk": cfg.ce_chunk, "mask": cfg.mask, "n_users_table": corpus.n_users + 1,
            "steps": a.steps, "warmup": a.warmup, "threads": a.threads, "data": source,
            "update_shared": True, "profile_config": cfg.to_dict(),
        },
    }
    path = write_result(out_path(NAME, a.out), result)
    sp = (f"naive fp32 {naive_s:.3f} s -> {speedup:.2f}x (target >= {TARGET_SPEEDUP:g}x: "
          f"{verdict(speedup >= TARGET_SPEEDUP)}), naive bf16 {naive_bf16_s:.3f} s -> {speedup_bf16:.2f}x "
          f"(target >= {TARGET_SPEEDUP_BF16:g}x: {verdict(speedup_bf16 >= TARGET_SPEEDUP_BF16)})"
          if naive_s and naive_bf16_s else "naive skipped")
    print(f"{NAME}: step {step_s:.3f} s vs {sp} | {result['tokens_per_s']:.0f} tok/s | {achieved:.3f} TFLOP/s = "
          f"{100 * frac_bf16:.0f}% of bf16 peak {peak_bf16['tflops']:.3f}, {100 * frac_fp32:.0f}% of fp32 peak "
          f"{peak_fp32['tflops']:.3f} (target >= {100 * TARGET_PEAK_FRACTION:.0f}% of {own_dtype}: "
          f"{verdict(frac_own >= TARGET_PEAK_FRACTION)}) | {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
