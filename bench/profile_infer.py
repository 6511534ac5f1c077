"""New-user profile IDs: cost per user, cost of one more interaction, and stability from half the history.

    python bench/profile_infer.py --profiles PROFILES --data DATA      # a fitted PROFILES dir (amortised or em)
    python bench/profile_infer.py --smoke                              # a tiny fit on the taste world, seconds

1. Cost: ``infer_profiles`` on a batch of ``--users`` fitted users with the pooled-state cache off (so every
   history is read by the LLM), seconds per user after the model load. A fit with a distilled student
   (``profile.student``) is timed with both encoders side by side (``by_encoder``): the student with its
   item-state cache off (every distinct interaction of the batch read) and on (as the fit left it), and the
   LLM reading the windows.
2. One more interaction: the encoder's no-grad pass over one window with and without one more item, per item
   (amortised fits; the per-user EM refits instead); the student's: one interaction read alone.
3. Stability: the same users re-inferred from only the first half of their train history (everything after
   it removed), vs their fitted IDs: agreement and Cohen's kappa per profile (with a 95% bootstrap interval
   over the users), and the codes in use. A fitted user is read by their own cross-fitting fold's map, so
   ``same_as_full_history`` (the full history re-inferred) is 1.0 up to bf16 batch effects with the LLM
   encoder; the student's says how often it reproduces the fitted IDs from the same history.
4. ``--pool-layers 0,12``: the pooling alone, ms per user, side by side in one run: each listed decoder block
   (0 = the last; ``profile.pool_layer``), and the last layer with SDPA attention for reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import log, machine_info, out_path, temp_dir, write_result, write_world  # noqa: E402

NAME = "profile_infer"


def first_half(data, user_idx: list[int]):
    """The data with each of ``user_idx``'s train interactions after the first half (in time) removed."""
    inter = data.interactions
    train = inter[(inter["split"] == "train") & inter["user_idx"].isin(user_idx)]
    rank = train.groupby("user_idx").cumcount()
    size = train.groupby("user_idx")["item_idx"].transform("size")
    drop = train.index[rank >= np.ceil(size / 2)]
    return dataclasses.replace(data, interactions=inter.drop(index=drop))


def one_more_item_seconds(llm, cfg, data, user: int, reps: int = 5, student: bool = False) -> dict[str, float]:
    """Seconds of the encoder's pass over a user's last window, with and without one more rated item, pooled
    as the fit pools (``pool: rating`` timed as mean: the same forward). With ``pool: item`` or the student an
    interaction is read on its own, so folding one in costs a pass over that item alone (``item_alone``; nothing
    when the interaction is in the item-state cache)."""
    import torch

    from userip.data import behaviour_windows
    from userip.profile.pooled import pool_windows
    from userip.profile.template import encode_behaviour

    wins = behaviour_windows(data, "train", max_items=cfg.max_items, mode=cfg.behaviour, title_year=cfg.title_year)
    text = wins[user][-1]
    shorter = "; ".join(text.split("; ")[:-1]) or text
    pool = "mean" if cfg.pool == "rating" else cfg.pool
    out = {}
    runs = [("window", shorter), ("window_plus_one", text)]
    if pool == "item" or student:
        runs.append(("item_alone", text.split("; ")[-1]))
    for name, t in runs:
        ids = encode_behaviour(llm.tokenizer, t, 10_000)
        how = "mean" if name == "item_alone" else pool  # the student reads an item alone, at the last layer
        layer = 0 if name == "item_alone" else cfg.pool_layer
        pool_windows(llm, [ids], how, layer=layer)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            with torch.no_grad():
                pool_windows(llm, [ids], how, layer=layer)
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
        out[name + "_tokens"] = len(ids)
    out["one_more_item_s"] = out["item_alone"] if (pool == "item" or student) else (
        out["window_plus_one"] - out["window"])
    return out


def pooling_cost(llm, cfg, data, user_idx: list[int], layers: list[int]) -> dict[str, float]:
    """Milliseconds per user of pooling these users' train windows (as the fit reads them), side by side in one
    run: each of ``layers`` (0 = the last; ``profile.pool_layer``) as pooling runs (eager attention), and the
    last layer with SDPA for reference (slower here with the padding mask, so not used). Cost only: whether a
    middle layer's profiles are as good needs a fit with it."""
    from userip.profile.api import build_corpus
    from userip.profile.pooled import pool_windows

    corpus = build_corpus(data, llm.tokenizer, cfg)
    cap = cfg.history_windows
    windows = [w for u in user_idx for w in (corpus.train[u][-cap:] if cap else corpus.train[u])]

    def sdpa_last() -> None:
        before = llm.model.config._attn_implementation
        llm.model.set_attn_implementation("sdpa")
        try:
            pool_windows(llm, windows, cfg.pool, cfg.pool_batch)
        finally:
            llm.model.set_attn_implementation(before)

    pool_windows(llm, windows[:32])  # warm-up
    runs = {f"{f'block{layer}' if layer else 'last'}": (lambda layer=layer: pool_windows(
        llm, windows, cfg.pool, cfg.pool_batch, layer=layer)) for layer in layers}
    runs["sdpa_last"] = sdpa_last
    out: dict[str, float] = {"windows": len(windows), "tokens": sum(len(w) + 1 for w in windows)}
    for name, run in runs.items():
        t0 = time.perf_counter()
        run()
        out[name] = (time.perf_counter() - t0) * 1000 / len(user_idx)
        log(f"pooling {name}: {out[name]:.0f} ms/user")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles")
    p.add_argument("--data")
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out")
    p.add_argument("--pool-layers", default="",
                   help="comma list of decoder blocks (0 = the last) whose pooling cost to time side by side")
    a = p.parse_args()

    from sklearn.metrics import cohen_kappa_score

    from userip.data import load_prepared
    from userip.io import read_yaml
    from userip.llm import load_llm, tiny_llm
    from userip.profile import ProfileConfig, fit_profiles, has_student, infer_profiles, read_ids

    if a.smoke:
        from userip.data import prepare

        d = temp_dir("infer")
        import os

        os.environ["USERIP_CACHE_DIR"] = str(d / "cache")  # the pooled-state cache of this throwaway fit
        world = write_world(d / "world", n_users=40)
        prepare(d / "data", interactions=world / "inter.csv", items=world / "items.csv")
        llm = tiny_llm()
        fit_profiles(d / "data", d / "prof", llm=llm, progress=False, inference="amortised", epochs=2,
                     batch_users=8, rank=4, eval_users=16, bootstrap=100, student="item")
        a.profiles, a.data, a.users = str(d / "prof"), str(d / "data"), 20
    else:
        if not (a.profiles and a.data):
            p.error("--profiles and --data are required (or --smoke)")
        llm = None
    conf = read_yaml(Path(a.profiles) / "config.yaml")
    cfg = ProfileConfig.from_dict(conf["profile"])
    data = load_prepared(a.data)
    fitted = read_ids(a.profiles)
    rng = np.random.default_rng(a.seed)
    pick = fitted.iloc[np.sort(rng.choice(len(fitted), min(a.users, len(fitted)), replace=False))]
    users = pick["user_id"].astype(str).tolist()
    t0 = time.perf_counter()
    llm = llm or load_llm(conf["model"], dtype=cfg.dtype, device=cfg.device)
    load_s = time.perf_counter() - t0
    encoders = ["student", "llm"] if has_student(a.profiles) else ["auto"]
    boot = np.random.default_rng(a.seed + 1).integers(0, len(users), size=(1000, len(users)))
    halved = first_half(data, pick["user_idx"].tolist())
    by_encoder = {}
    for enc in encoders:
        log(f"model loaded in {load_s:.1f}s; inferring {len(users)} users, encoder {enc} (cache off)")
        full = infer_profiles(a.profiles, data, users, llm=llm, progress=False, pooled_cache=False, encoder=enc)
        log(f"{enc}: {full.attrs['seconds_per_user'] * 1000:.0f} ms per user")
        half = infer_profiles(a.profiles, halved, users, llm=llm, progress=False, pooled_cache=False, encoder=enc)
        stability = {}
        for prof in cfg.profiles:
            f, h = pick[prof.name].to_numpy(), half[prof.name].to_numpy()
            # kappa of 100 users varies a lot with which users were drawn: a 95% bootstrap interval over them
            ks = [cohen_kappa_score(f[b], h[b]) for b in boot]
            same = full[prof.name].to_numpy()
            stability[prof.name] = {
                "agreement": float((f == h).mean()),
                "kappa": float(cohen_kappa_score(f, h)),
                "kappa_95ci": [float(np.nanpercentile(ks, 2.5)), float(np.nanpercentile(ks, 97.5))],
                "codes_used_fitted": int(len(set(f.tolist()))),
                "codes_used_half": int(len(set(h.tolist()))),
                "codebook_size": prof.codebook_size,
                "same_as_full_history": float((same == f).mean()),
                "kappa_full_history": float(cohen_kappa_score(f, same)),
            }
        res_enc = {"ms_per_user": full.attrs["seconds_per_user"] * 1000,
                   "ms_per_user_half_history": half.attrs["seconds_per_user"] * 1000,
                   "stability_first_half": stability}
        if enc == "student":  # what a deployment sees: the fit cached its users' interactions
            warm = infer_profiles(a.profiles, data, users, llm=llm, progress=False, encoder=enc)
            res_enc["ms_per_user_item_cache"] = warm.attrs["seconds_per_user"] * 1000
            log(f"student with the fit's item-state cache: {res_enc['ms_per_user_item_cache']:.1f} ms per user")
        by_encoder[enc] = res_enc
    first = by_encoder[encoders[0]]
    stability = first["stability_first_half"]
    extra = {}
    if cfg.inference == "amortised":
        extra = one_more_item_seconds(llm, cfg, data, int(pick["user_idx"].iloc[0]),
                                      student=encoders[0] == "student")
    if a.pool_layers:
        extra["pooling_ms_per_user"] = pooling_cost(llm, cfg, data, pick["user_idx"].astype(int).tolist(),
                                                    [int(x) for x in a.pool_layers.split(",")])
    res = {
        "name": NAME,
        "config": vars(a),
        "machine": machine_info(),
        "profiles": str(a.profiles),
        "inference": cfg.inference,
        "users": len(users),
        "model_load_s": load_s,
        "encoder": encoders[0],  # the one `profile infer` uses by default; every encoder timed: by_encoder
        "ms_per_user": first["ms_per_user"],
        "ms_per_user_half_history": first["ms_per_user_half_history"],
        "by_encoder": by_encoder,
        "history_windows": cfg.history_windows,
        "pool_layer": cfg.pool_layer,
        "pool": cfg.pool,
        "stability_first_half": stability,
        **extra,
    }
    path = write_result(out_path(NAME, a.out), res)
    kap = " ".join(f"{k} kappa {v['kappa']:.2f} [{v['kappa_95ci'][0]:.2f}, {v['kappa_95ci'][1]:.2f}]"
                   for k, v in stability.items())
    print(f"{NAME}: {res['ms_per_user']:.0f} ms/user ({len(users)} users, {res['machine'].get('cpu', '')}); "
          f"first-half history: {kap} -> {path}")


if __name__ == "__main__":
    main()
