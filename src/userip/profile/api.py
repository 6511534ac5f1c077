"""Public entry points of the profile stage: fit, read IDs. Used by the CLI and by `userip run`."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from userip.errors import UseripError
from userip.io import atomic_path, check_format, read_json, read_yaml, write_json, write_yaml
from userip.monitor import peak_rss_mb
from userip.profile.config import ProfileConfig
from userip.profile.corpus import Corpus
from userip.profile.em import ProfileFitter
from userip.profile.fitter import Fitter
from userip.seed import seed_everything

log = logging.getLogger(__name__)

OUTPUT_FILES = ("profiles.safetensors", "codebooks.safetensors", "profile_ids.parquet", "config.yaml",
                "metrics.json")


def load_config(path: str | Path | None, **overrides: Any) -> ProfileConfig:
    """Profile config from a YAML file (its `profile:` section, or the whole file) plus CLI overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise UseripError(f"{path}: expected a YAML mapping")
        d = dict(raw.get("profile", raw if "profile" not in raw and "data" not in raw else {}))
    return ProfileConfig.from_dict(d).replace(**overrides)


def build_corpus(data, tokenizer, cfg: ProfileConfig) -> Corpus:
    """Tokenised train windows and held-out (validation-period) windows from a prepared dataset, with the
    ceiling's in-context histories (the last ``ceiling_items`` train interactions) of users with held-out
    windows."""
    from userip.data import behaviour_windows, recent_history
    from userip.profile.dist import Dist

    kw = dict(max_items=cfg.max_items, tokenizer=tokenizer, max_tokens=cfg.max_tokens, mode=cfg.behaviour,
              title_year=cfg.title_year)
    train = behaviour_windows(data, "train", **kw)
    heldout = behaviour_windows(data, "val", **kw)
    if cfg.max_users:
        users = sorted(train)
        if len(users) > cfg.max_users:
            g = torch.Generator().manual_seed(cfg.seed)
            pick = torch.randperm(len(users), generator=g)[: cfg.max_users].tolist()
            keep = {users[i] for i in pick}
            train = {u: w for u, w in train.items() if u in keep}
            heldout = {u: w for u, w in heldout.items() if u in keep}
    d = Dist()
    if d.world > 1:  # this rank's shard of the users
        mine = set(d.shard(list(train)))
        train = {u: w for u, w in train.items() if u in mine}
        heldout = {u: w for u, w in heldout.items() if u in mine}
    history = recent_history(data, cfg.ceiling_items, "train", mode=cfg.behaviour, title_year=cfg.title_year)
    context = {u: history[u] for u in heldout if u in history}
    inter = data.interactions
    counts = inter[inter["split"] == "train"].groupby("user_idx").size()
    activity = np.zeros(data.n_users + 1, dtype=np.int64)
    activity[counts.index.to_numpy()] = counts.to_numpy()
    return Corpus.from_text(tokenizer, train, heldout, data.n_users, activity, cfg.max_tokens, context=context,
                            lead_in=cfg.ceiling_lead_in or lead_in(cfg.template), rated=cfg.behaviour == "rated")


def lead_in(template: str) -> str:
    """The template's text right before {behaviour} ("The user watched:"): the ceiling's plain-text prompt."""
    tail = re.split(r"\{[A-Za-z_][A-Za-z0-9_]*\}", template)[-2]
    return tail.lstrip(" .").strip()


def make_fitter(llm, cfg: ProfileConfig, corpus: Corpus, out: Path | None, progress: bool = False,
                pooled_cache: bool = True, read_history: bool = True) -> Fitter:
    """The fitter of ``cfg.inference``: per-user EM, the amortised history map, or the map refined by EM."""
    if cfg.inference in ("amortised", "hybrid"):
        from userip.profile.amortised import AmortisedFitter
        from userip.profile.hybrid import HybridFitter
        from userip.profile.pooled import PooledStates

        states = PooledStates(llm, cfg.pool, cfg.pool_batch, cache="default" if pooled_cache else None,
                              layer=cfg.pool_layer)
        cls = HybridFitter if cfg.inference == "hybrid" else AmortisedFitter
        return cls(llm, cfg, corpus, out, states=states, progress=progress, read_history=read_history)
    return ProfileFitter(llm, cfg, corpus, out)


def fit_profiles(data_dir: str | Path, out: str | Path, *, model: str = "smollm2-135m",
                 config: str | Path | ProfileConfig | None = None, llm=None, progress: bool = True,
                 previous: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Fit profiles on a prepared dataset's train split and write the PROFILES directory.

    Rerunning after a kill resumes from ``out/checkpoints`` (same config) and ends with the same IDs.
    ``previous``: a PROFILES dir this fit refits; its codes are relabelled (Hungarian matching, see
    ``userip.quantize.match_codes``) so users keep their old IDs where the clusters allow, and ``metrics["refit"]``
    says per profile how many users changed ID. Returns the metrics dict also written to ``metrics.json``.
    """
    from userip.data import load_prepared
    from userip.llm import load_llm

    cfg = config if isinstance(config, ProfileConfig) else load_config(config)
    cfg = cfg.replace(**overrides)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_prepared(data_dir)
    llm = llm or load_llm(model, dtype=cfg.dtype, device=cfg.device)
    corpus = build_corpus(data, llm.tokenizer, cfg)
    fitter = make_fitter(llm, cfg, corpus, out, progress=progress)
    state = fitter.fit(progress=progress)
    refit = None
    if previous is not None:
        from userip.profile.refit import align_to_previous

        refit = align_to_previous(fitter, previous, data.user_ids(fitter.all_users.numpy()), llm.name)
        if state.final:  # code usage is listed per ID: recount it under the new labels
            state.final = {**state.final, **fitter.code_stats()}
    # the new-user encoder, distilled from the final one (after any relabelling: it predicts inputs, not codes)
    student = fitter.fit_student(progress=progress) if cfg.student != "none" else None
    metrics = {
        "epochs": state.metrics,
        "best_epoch": state.best_epoch,
        "final": state.final or (state.metrics or [{}])[-1],
        "n_users": len(fitter.all_users),
        "inference": cfg.inference,
        "compute": fitter.compute(),  # training's LLM tokens per phase: compare inference modes at equal compute
        "ceiling": getattr(fitter, "ceiling_metrics", None),
        "processes": fitter.dist.world,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    if refit is not None:
        metrics["refit"] = refit
    if student is not None:
        metrics["student"] = student
    write_outputs(out, fitter, data, cfg, llm.name, metrics)
    return metrics


def write_outputs(out: Path, fitter: Fitter, data, cfg: ProfileConfig, model_name: str,
                  metrics: dict[str, Any]) -> None:
    """Write the PROFILES contract files (each atomically). Never the LLM weights."""
    from userip.quantize import save_codebooks

    st = fitter.state
    theta, personal = fitter.theta_table()  # collective under torch.distributed: every rank takes part
    if not fitter.dist.is_main:
        return
    tensors = {"theta": theta, "personal": personal, "shared": fitter.profiles.shared.detach().contiguous()}
    tensors.update(fitter.output_tensors())
    if st.mu is not None:
        tensors.update({"code_center": st.mu.contiguous(), "code_scale": st.scale.contiguous()})
    with atomic_path(out / "profiles.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"model": model_name, "table": cfg.table})
    cb_meta = {"model": model_name}
    if metrics.get("refit"):  # lineage: these codes were relabelled to keep the IDs of those codebooks
        cb_meta["previous_codebook_hash"] = metrics["refit"]["previous_codebook_hash"]
    save_codebooks(out / "codebooks.safetensors", {k: v.detach() for k, v in st.codebooks.items()},
                   metadata=cb_meta)
    z = fitter.assignments()
    users = fitter.all_users.numpy()
    ids = pd.DataFrame({"user_id": data.user_ids(users), "user_idx": users.astype(np.int64)})
    for k, p in enumerate(cfg.profiles):
        ids[p.name] = z[fitter.all_users, k].numpy().astype(np.int64)
    with atomic_path(out / "profile_ids.parquet") as tmp:
        ids.to_parquet(tmp, index=False)
    conf = {
        "model": model_name,
        "template": cfg.template,
        "profiles": [{"name": p.name, "n_tokens": p.n_tokens, "codebook_size": p.codebook_size}
                     for p in cfg.profiles],
        "data_fingerprint": data.fingerprint,
        "data_dir": str(getattr(data, "path", "") or ""),
        "hidden_size": fitter.profiles.hidden,
        "profile": cfg.to_dict(),
    }
    write_yaml(out / "config.yaml", conf)
    write_json(out / "metrics.json", metrics)


def infer_profiles(profiles_dir: str | Path, data_dir: str | Path | Any, user_ids: list[str], *, llm=None,
                   bank: str | Path | None = None, progress: bool = True, pooled_cache: bool = True,
                   encoder: str = "auto") -> pd.DataFrame:
    """IDs for users not in the fit, with the LLM, shared prompt and codebooks frozen (no retraining).

    ``data_dir`` (a DATA dir or a loaded PreparedData) holds the users' behaviour (the fit's data or a newer
    export). Amortised fits read each user's train windows in one no-grad pass of the LLM (no gradient step;
    ``pooled_cache=False`` recomputes states the cache already holds), or, with ``encoder`` auto or student and
    a fit that has one, each interaction on its own through the distilled student (``userip.profile.student``:
    interactions read before cost nothing unless ``pooled_cache=False``); EM fits fit each new user's residual with
    the training budget. With ``bank``, the IDs are upserted (an atomic rebuild: readers see the old bank or the
    new one). Returns user_id + one column per profile; ``attrs["seconds_per_user"]`` excludes the model load.
    """
    from userip.data import load_prepared
    from userip.llm import load_llm

    profiles_dir = Path(profiles_dir)
    check_format(profiles_dir, "profiles")
    conf = read_yaml(profiles_dir / "config.yaml")
    cfg = ProfileConfig.from_dict(conf["profile"])
    data = load_prepared(data_dir) if isinstance(data_dir, (str, Path)) else data_dir
    idx = data.user_index([str(u) for u in user_ids])
    missing = [u for u, i in zip(user_ids, idx, strict=True) if i == 0]
    if missing:
        raise UseripError(f"{data_dir}: unknown user ids {missing[:10]} (expected ids present in users/interactions)")
    t_load = time.perf_counter()
    llm = llm or load_llm(conf["model"], dtype=cfg.dtype, device=cfg.device)
    t0 = time.perf_counter()
    inter = data.interactions  # only these users' behaviour is rendered
    mine = dataclasses.replace(data, interactions=inter[inter["user_idx"].isin(idx.tolist())])
    full = build_corpus(mine, llm.tokenizer, cfg.replace(max_users=0))
    fitted = read_ids(profiles_dir)
    n_old = int(fitted["user_idx"].max()) if len(fitted) else 0
    train, marks, rows = {}, {}, []
    for i, (uid, u) in enumerate(zip(user_ids, idx.tolist(), strict=True)):
        if u not in full.train:
            raise UseripError(f"{data_dir}: user {uid} has no train-split behaviour to infer a profile from")
        row = n_old + 1 + i  # new rows after the fitted ones: dense indices of another export may differ
        train[row] = full.train[u]
        if u in full.train_marks:
            marks[row] = full.train_marks[u]
        rows.append(row)
    corpus = Corpus(train, {}, n_old + len(rows), np.zeros(n_old + len(rows) + 1, dtype=np.int64),
                    train_marks=marks)
    from userip.profile.amortised import AmortisedFitter

    if encoder not in ("auto", "llm", "student"):
        raise UseripError(f"encoder '{encoder}' is not one of auto, llm, student")
    student = encoder != "llm" and has_student(profiles_dir)
    if encoder == "student" and not student:
        raise UseripError(f"{profiles_dir}: encoder 'student', but this fit has no student (fit with "
                          "profile.student: item, or add one with `userip profile distil`)")
    fitter = make_fitter(llm, cfg, corpus, None, pooled_cache=pooled_cache, read_history=not student)
    fitter.load_fitted(profiles_dir)
    if isinstance(fitter, AmortisedFitter):  # a fitted user is read as the fit read them (their fold's map)
        known = dict(zip(fitted["user_id"].astype(str), fitted["user_idx"].astype(int), strict=True))
        fitted_rows = torch.tensor([known.get(str(u), 0) for u in user_ids])
        z = fitter.infer(torch.tensor(rows), progress=progress, fitted_rows=fitted_rows, encoder=encoder,
                         item_cache=pooled_cache)
    else:
        z = fitter.infer(torch.tensor(rows), progress=progress)
    out = pd.DataFrame({"user_id": [str(u) for u in user_ids]})
    for k, p in enumerate(cfg.profiles):
        out[p.name] = z[:, k].numpy().astype(np.int64)
    seconds = time.perf_counter() - t0
    out.attrs["seconds_per_user"] = seconds / max(len(user_ids), 1)
    out.attrs["load_seconds"] = t0 - t_load
    if bank is not None:
        from userip.bank import open_bank

        with open_bank(bank) as b:
            table = b.to_frame()
            keep = table[~table["user_id"].astype(str).isin(out["user_id"])]
            merged = pd.concat([keep, out[[c for c in table.columns if c in out.columns]]], ignore_index=True)
            b.build(merged, b.meta())
    return out


def distil_profiles(profiles_dir: str | Path, data_dir: str | Path, *, llm=None, progress: bool = True
                    ) -> dict[str, Any]:
    """Add the distilled new-user encoder (``profile.student: item``) to an amortised fit that has none, or
    replace it: the fit's encoder reads the fitted users' windows as in the fit (the pooled-state cache), the
    student is fitted to it, and profiles.safetensors, metrics.json and config.yaml are rewritten atomically.
    Fitted IDs, codebooks and the map do not change. Returns the student's metrics."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from userip.data import load_prepared
    from userip.llm import load_llm
    from userip.profile.amortised import AmortisedFitter

    profiles_dir = Path(profiles_dir)
    check_format(profiles_dir, "profiles")
    conf = read_yaml(profiles_dir / "config.yaml")
    cfg = ProfileConfig.from_dict(conf["profile"])
    if cfg.inference != "amortised":
        raise UseripError(f"{profiles_dir}: inference '{cfg.inference}'; a student distils an amortised fit")
    cfg = cfg.replace(student="item")
    data = load_prepared(data_dir)
    if conf.get("data_fingerprint") and data.fingerprint != conf["data_fingerprint"]:
        raise UseripError(f"{data_dir}: not the data {profiles_dir} was fitted on (data_fingerprint differs); "
                          "the student must read the fitted users' histories")
    llm = llm or load_llm(conf["model"], dtype=cfg.dtype, device=cfg.device)
    fitter = make_fitter(llm, cfg, build_corpus(data, llm.tokenizer, cfg), None, progress=progress)
    assert isinstance(fitter, AmortisedFitter)
    fitter.load_fitted(profiles_dir)
    if fitter.fitted_fold is not None and len(fitter.fitted_fold) == len(fitter.fold):
        fitter.fold = fitter.fitted_fold.clone()
    student = fitter.fit_student(progress=progress)
    path = profiles_dir / "profiles.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("student.")}
    tensors.update({k: v.contiguous() for k, v in fitter.student.to_tensors().items()})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    metrics = read_json(profiles_dir / "metrics.json")
    metrics["student"] = student
    write_json(profiles_dir / "metrics.json", metrics)
    conf["profile"] = cfg.to_dict()
    write_yaml(profiles_dir / "config.yaml", conf)
    return student


def has_student(profiles_dir: str | Path) -> bool:
    """Whether a PROFILES dir holds a distilled new-user encoder (``profile.student``)."""
    from safetensors import safe_open

    with safe_open(str(Path(profiles_dir) / "profiles.safetensors"), "pt") as f:
        return "student.coef" in set(f.keys())


def read_ids(profiles_dir: str | Path) -> pd.DataFrame:
    p = Path(profiles_dir) / "profile_ids.parquet"
    if not p.exists():
        raise UseripError(f"{p}: not found; run `userip profile fit` first")
    return pd.read_parquet(p)


def id_counts(profiles_dir: str | Path) -> dict[str, dict[int, int]]:
    """Users per code, per profile (what `userip profile ids` prints)."""
    ids = read_ids(profiles_dir)
    conf = read_yaml(Path(profiles_dir) / "config.yaml")
    out = {}
    for p in conf["profiles"]:
        vc = ids[p["name"]].value_counts()
        out[p["name"]] = {k: int(vc.get(k, 0)) for k in range(1, int(p["codebook_size"]) + 1)}
    return out
