"""Online cost of a user profile: a feature-bank lookup vs producing the profile the LLM way.

    python bench/online.py                       # SQLite bank of 100k users with random IDs, SmolLM2-135M
    python bench/online.py --bank RUN/bank.sqlite  # an existing bank (e.g. the 943 ML-100K users)
    python bench/online.py --smoke               # small bank, tiny model, seconds

Lookup: ``open_bank(path).get(ids)`` in process (as the server does: reload checks on), random known users;
latency per call for batch 1 and batch 512 (p50/p99, and per user), throughput in users/s.
LLM way: per user, ``text_profile.generate`` (greedy, the baseline's prompt with the user's last 30 titles,
batch 1) + MiniLM ``encode`` of the text, on ``--llm-users`` users after one untimed warm-up; also one
batched generate of the same users for the amortised cost. Ratio = median LLM-way seconds per user / lookup
p99 per user at batch 1 (conservative: tail lookup vs typical generation).
Bytes per user: profile IDs (m ints, int8 when K <= 127 else int16) vs theta (m*n*H fp32) vs the generated
text (mean UTF-8 bytes) and its MiniLM embedding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    load_behaviour_data,
    log,
    machine_info,
    out_path,
    percentile,
    synthetic_titles,
    temp_dir,
    verdict,
    write_result,
)

NAME = "online"
TARGET_P99_US = 50.0
TARGET_RATIO = 1e4


def build_random_bank(path: Path, n_users: int, sizes: dict[str, int], seed: int = 0):
    import pandas as pd

    from userip.bank import open_bank

    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"user_id": [f"u{i}" for i in range(1, n_users + 1)]})
    for name, k in sizes.items():
        table[name] = rng.integers(1, k + 1, n_users).astype(np.int64)
    meta = {"profiles": [{"name": n, "size": k} for n, k in sizes.items()], "data_fingerprint": "bench-random",
            "model": "random", "template": None}
    bank = open_bank(path, create=True)
    bank.build(table, meta)
    bank.close()


def time_lookups(bank, user_ids: list[str], batch: int, calls: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    pool = np.asarray(user_ids, dtype=object)
    batches = [list(pool[rng.integers(0, len(pool), batch)]) for _ in range(calls)]
    for b in batches[: max(1, calls // 20)]:  # warm the page cache and statement cache
        bank.get(b)
    ns = np.empty(calls, dtype=np.int64)
    clock = time.perf_counter_ns
    for i, b in enumerate(batches):
        t0 = clock()
        bank.get(b)
        ns[i] = clock() - t0
    us = ns / 1e3
    return {"batch": batch, "calls": calls, "p50_us": percentile(us, 50), "p99_us": percentile(us, 99),
            "mean_us": float(us.mean()), "p50_us_per_user": percentile(us, 50) / batch,
            "p99_us_per_user": percentile(us, 99) / batch, "users_per_s": batch * calls / (ns.sum() / 1e9)}


def user_titles(n: int, smoke: bool, data_arg: str | None, max_items: int = 30) -> tuple[list[list[str]], str]:
    """Last ``max_items`` train titles of ``n`` users (real data when available, else synthetic titles)."""
    data, source = load_behaviour_data(data_arg, smoke)
    if data is not None:
        from userip.baselines.text_profile import train_titles

        hist = train_titles(data, max_items=max_items)
        users = sorted(hist)
        rng = np.random.default_rng(0)
        pick = sorted(int(u) for u in rng.choice(users, size=min(n, len(users)), replace=False))
        return [hist[u] for u in pick], source
    titles = synthetic_titles()
    rng = np.random.default_rng(0)
    return [[titles[i] for i in rng.integers(0, len(titles), max_items)] for _ in range(n)], "synthetic"


def id_bytes(size: int) -> int:
    return 1 if size <= 127 else 2 if size <= 32767 else 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="small bank, tiny model: runs in seconds")
    p.add_argument("--out", help=f"result JSON (default bench/results/{NAME}.json)")
    p.add_argument("--bank", help="an existing bank (path or URL); default: build a random one in a temp dir")
    p.add_argument("--users", type=int, default=None, help="users in the random bank (default 100000)")
    p.add_argument("--calls", type=int, default=None, help="timed batch-1 calls (default 20000)")
    p.add_argument("--batch-calls", type=int, default=None, help="timed batch-512 calls (default 500)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", help="prepared data dir for the users' titles (default as em_step.py)")
    p.add_argument("--llm-users", type=int, default=None, help="users profiled the LLM way (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="as the text-profile baseline")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --smoke)")
    a = p.parse_args(argv)
    a.threads = a.threads or (1 if a.smoke else 2)
    a.users = a.users or (2000 if a.smoke else 100_000)
    a.calls = a.calls or (500 if a.smoke else 20_000)
    a.batch_calls = a.batch_calls or (20 if a.smoke else 500)
    a.llm_users = a.llm_users or (2 if a.smoke else 8)
    if a.smoke:
        a.max_new_tokens = min(a.max_new_tokens, 8)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    from userip.bank import open_bank
    from userip.profile import ProfileConfig

    torch.set_num_threads(a.threads)
    tmp = temp_dir("online")
    if a.bank:
        location, built = a.bank, False
    else:
        location, built = str(tmp / "bank.sqlite"), True
        log(f"[{NAME}] building a random SQLite bank of {a.users} users in {location}")
        build_random_bank(Path(location), a.users, {"hobby": 4, "background": 3})
    bank = open_bank(location)
    frame = bank.to_frame()
    user_ids = frame["user_id"].astype(str).tolist()
    sizes = {p["name"]: int(p["size"]) for p in bank.meta()["profiles"]}
    log(f"[{NAME}] bank {location}: {len(user_ids)} users, profiles {sizes}")

    single = time_lookups(bank, user_ids, 1, a.calls)
    log(f"[{NAME}] batch 1:   p50 {single['p50_us']:.1f} us, p99 {single['p99_us']:.1f} us, "
        f"{single['users_per_s']:.0f} users/s")
    batched = time_lookups(bank, user_ids, 512, a.batch_calls, seed=1)
    log(f"[{NAME}] batch 512: p50 {batched['p50_us']:.0f} us, p99 {batched['p99_us']:.0f} us per call "
        f"({batched['p99_us_per_user']:.2f} us/user p99), {batched['users_per_s']:.0f} users/s")
    bank.close()

    # ------------------------------------------------------------------ the LLM way
    from userip.baselines.encoder import encoder_available, get_encoder
    from userip.baselines.text_profile import generate, render_prompt
    from userip.llm import load_llm, tiny_llm

    log(f"[{NAME}] loading {'tiny model' if a.smoke else a.model} for the LLM way")
    llm = tiny_llm(seed=0) if a.smoke else load_llm(a.model)
    histories, source = user_titles(a.llm_users, a.smoke, a.data, max_items=5 if a.smoke else 30)
    prompts = [render_prompt(llm.tokenizer, h) for h in histories]
    enc = get_encoder() if encoder_available() else None
    if enc is None:
        log(f"[{NAME}] MiniLM encoder not installed: the LLM way is timed without the encode step")
    generate(llm, prompts[:1], max_new_tokens=a.max_new_tokens, batch_size=1)  # warm-up, untimed
    if enc is not None:
        enc.encode(["warm up"])
    gen_s, enc_s, texts = [], [], []
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        out, _ = generate(llm, [prompt], max_new_tokens=a.max_new_tokens, batch_size=1)
        t1 = time.perf_counter()
        if enc is not None:
            enc.encode(out)
        t2 = time.perf_counter()
        gen_s.append(t1 - t0)
        enc_s.append(t2 - t1)
        texts.append(out[0])
        log(f"[{NAME}] LLM way user {i + 1}/{len(prompts)}: generate {t1 - t0:.2f} s + encode {t2 - t1:.3f} s "
            f"-> {out[0][:70]!r}")
    t0 = time.perf_counter()
    generate(llm, prompts, max_new_tokens=a.max_new_tokens, batch_size=len(prompts))
    if enc is not None:
        enc.encode(texts)
    batched_llm_s = (time.perf_counter() - t0) / len(prompts)
    per_user = [g + e for g, e in zip(gen_s, enc_s, strict=True)]
    llm_median = float(np.median(per_user))
    lookup_p99_s = single["p99_us"] / 1e6
    ratio = llm_median / lookup_p99_s
    ratio_batched = batched_llm_s / (batched["p99_us_per_user"] / 1e6)

    # ------------------------------------------------------------------ bytes per user
    cfg = ProfileConfig()
    m = len(sizes)
    n = max(p.n_tokens for p in cfg.profiles)
    H = llm.hidden_size if not a.smoke else 576  # report SmolLM2's theta size even in smoke mode
    text_bytes = float(np.mean([len(t.encode("utf-8")) for t in texts]))
    bytes_per_user = {
        "ids": sum(id_bytes(k) for k in sizes.values()),
        "theta_fp32": m * n * H * 4,
        "text_mean_utf8": text_bytes,
        "text_embedding_fp32": (enc.dim if enc is not None else 384) * 4,
        "bank_file": (Path(location).stat().st_size / len(user_ids)) if built or Path(location).is_file() else None,
    }
    ok_p99 = single["p99_us"] <= TARGET_P99_US
    ok_ratio = ratio >= TARGET_RATIO
    result = {
        "name": NAME,
        "lookup_batch1": single,
        "lookup_batch512": batched,
        "lookup_p50_us": single["p50_us"],
        "lookup_p99_us": single["p99_us"],
        "lookup_p99_us_per_user_batch512": batched["p99_us_per_user"],
        "lookup_users_per_s_batch1": single["users_per_s"],
        "lookup_users_per_s_batch512": batched["users_per_s"],
        "llm_way": {"users": len(prompts), "generate_s": gen_s, "encode_s": enc_s, "per_user_s": per_user,
                    "median_s_per_user": llm_median, "batched_s_per_user": batched_llm_s,
                    "max_new_tokens": a.max_new_tokens, "texts": texts, "encoder": enc is not None,
                    "model": llm.name, "dtype": str(llm.dtype), "titles_from": source},
        "llm_median_s_per_user": llm_median,
        "ratio_llm_vs_lookup": ratio,
        "ratio_llm_batched_vs_lookup_batched": ratio_batched,
        "bytes_per_user": bytes_per_user,
        "targets": {"lookup_p99_us": TARGET_P99_US, "ratio": TARGET_RATIO, "lookup_p99_met": ok_p99,
                    "ratio_met": ok_ratio},
        "machine": machine_info("cpu"),
        "config": {"smoke": a.smoke, "bank": location if not built else "random (temp)", "bank_users": len(user_ids),
                   "profiles": sizes, "calls": a.calls, "batch_calls": a.batch_calls, "threads": a.threads,
                   "theta_shape": [m, n, H]},
    }
    path = write_result(out_path(NAME, a.out), result)
    print(f"{NAME}: lookup p50 {single['p50_us']:.1f} us / p99 {single['p99_us']:.1f} us per user at batch 1 "
          f"(target <= {TARGET_P99_US:g} us: {verdict(ok_p99)}), {batched['p99_us_per_user']:.2f} us/user p99 at "
          f"batch 512, {batched['users_per_s']:.0f} users/s | LLM way {llm_median:.2f} s/user -> ratio "
          f"{ratio:.1e} (target >= {TARGET_RATIO:.0e}: {verdict(ok_ratio)}) | bytes/user ids "
          f"{bytes_per_user['ids']} vs theta {bytes_per_user['theta_fp32']} vs text {text_bytes:.0f} | {path}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
