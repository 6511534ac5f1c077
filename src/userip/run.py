"""The main job: every stage in order, each skipped when its outputs exist and match the config.

    data -> profiles -> bank -> explain -> baselines -> ctr -> probe -> report

(Baselines run before the CTR table so their rows sit in the same harness, same split and seeds.)
A stage's key is a hash of its config section and the keys of the stages it reads, so editing the CTR
section reruns only ctr, probe and report; a crash mid-stage reruns that stage (the profile fit itself
resumes from its epoch checkpoints).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from userip.errors import UseripError
from userip.io import claim_output_dir, read_json, read_yaml, write_json, write_yaml
from userip.monitor import measure, release_memory

log = logging.getLogger(__name__)
console = Console()

def _default_config() -> Path:
    """configs/ml-100k.yaml: shipped in the package (a wheel install), else the source tree's copy.

    src/userip/configs/ml-100k.yaml is a link to the repo's configs/ml-100k.yaml, and the wheel carries the file
    itself; a checkout without symlink support (the link is a broken path there) falls back to the repo file.
    """
    packaged = Path(__file__).resolve().parent / "configs" / "ml-100k.yaml"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs" / "ml-100k.yaml"


DEFAULT_CONFIG = _default_config()
STAGES = ("data", "profiles", "bank", "explain", "baselines", "ctr", "probe", "report")
# which config sections and upstream stages each stage depends on
DEPENDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data": (("data", "users", "seed"), ()),
    "profiles": (("model", "profile", "seed"), ("data",)),
    "bank": ((), ("profiles",)),
    "explain": (("explain",), ("profiles",)),
    "baselines": (("baselines", "model", "seed"), ("data", "profiles")),
    "ctr": (("ctr",), ("bank", "baselines")),
    "probe": (("probe", "seed"), ("profiles", "baselines")),
    "report": (("report",), ("ctr", "explain", "probe")),
}


def load_run_config(path: str | Path | None = None, quick: bool = False, **overrides: Any) -> dict[str, Any]:
    """The run config: a YAML file with one section per stage; ``quick`` merges its `quick:` section."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.exists():
        raise UseripError(f"config {path}: not found")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise UseripError(f"config {path}: expected a YAML mapping of sections")
    cfg: dict[str, Any] = {"name": path.stem, "seed": 0, "users": 0, "model": "smollm2-135m", "data": {},
                           "profile": {}, "ctr": {}, "baselines": {}, "explain": {}, "probe": {}, "report": {}}
    quick_section = raw.pop("quick", {}) or {}
    cfg = _merge(cfg, raw)
    if quick:
        cfg = _merge(cfg, quick_section)
        cfg["name"] = f"{cfg['name']}-quick"
    cfg = _merge(cfg, {k: v for k, v in overrides.items() if v is not None})
    cfg["config_path"] = str(path)
    return cfg


def _params(fn: Callable[..., Any], drop: tuple[str, ...]) -> set[str]:
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind in kinds and n not in drop}


def check_sections(cfg: dict[str, Any]) -> None:
    """Unknown keys in the `ctr:`, `explain:`, `baselines:` and `probe:` sections are a clear `UseripError` (the stage
    functions would raise a TypeError mid-run, after the expensive stages); so is a section that is not a
    mapping."""
    from userip.baselines import text_profile_baseline
    from userip.ctr import run_ctr_table, train_ctr
    from userip.explain import explain

    fixed = ("data", "data_dir", "llm", "cardinalities", "seed", "cache_dir", "out", "overwrite", "progress",
             "meta", "extra_ids", "extra_dense", "profiles_dir", "bank", "write", "train", "val", "test", "ids",
             "id_sizes", "activity", "theta", "profile_names", "user_label_rate", "reads", "baselines",
             "behaviour", "title_year")  # the last two: the baselines read what the profiles read, never other
    known = {
        "ctr": _params(train_ctr, fixed) | _params(run_ctr_table, fixed),
        "explain": _params(explain, (*fixed, "profiles_dir")),
        "baselines": _params(text_profile_baseline, fixed) | {"content_kmeans", "text_profile", "history"},
        "probe": {"targets"},
    }
    where = cfg.get("config_path", "run config")
    for section, keys in known.items():
        value = cfg.get(section) or {}
        if not isinstance(value, dict):
            raise UseripError(f"config {where}: section '{section}' must be a mapping, got {type(value).__name__}")
        unknown = sorted(set(value) - keys)
        if unknown:
            raise UseripError(f"config {where}: unknown keys {unknown} in the '{section}:' section; "
                              f"known keys: {sorted(keys)}")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _key(cfg: dict[str, Any], stage: str, keys: dict[str, str]) -> str:
    sections, upstream = DEPENDS[stage]
    blob = {"sections": {s: cfg.get(s) for s in sections}, "upstream": {u: keys[u] for u in upstream}}
    if stage == "baselines":  # which baselines are built follows what ctr.variants reads
        blob["reads"] = sorted(_baselines_read(cfg.get("ctr") or {}))
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Runner:
    """Holds the run directory, config and the lazily loaded LLM shared by the stages that need it."""

    def __init__(self, cfg: dict[str, Any], out: Path, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self._llm = None

    @property
    def llm(self):
        if self._llm is None:
            from userip.llm import load_llm

            p = self.cfg.get("profile", {})
            self._llm = load_llm(self.cfg["model"], dtype=p.get("dtype", "auto"), device=p.get("device", "cpu"))
        return self._llm

    # ---------------------------------------------------------------- stages
    def data(self) -> dict[str, Any]:
        from userip.data import prepare

        d = prepare(self.out / "data", config=self.cfg["data"] or None, max_users=self.cfg["users"] or None,
                    seed=self.cfg["seed"], overwrite=True)  # the run owns its data dir
        return {"users": d.n_users, "items": d.n_items, "interactions": len(d.interactions)}

    def profiles(self) -> dict[str, Any]:
        from userip.profile import ProfileConfig, fit_profiles

        pcfg = ProfileConfig.from_dict({"seed": self.cfg["seed"], **self.cfg["profile"]})
        # the run owns its profiles dir: keep the checkpoints, the fit continues from them when they match
        claimed = claim_output_dir(self.out / "profiles", "profiles", overwrite=True, clear=False)
        m = fit_profiles(self.out / "data", self.out / "profiles", model=self.cfg["model"], config=pcfg,
                         llm=self.llm, progress=self.progress)
        claimed.complete()
        return {"best_epoch": m["best_epoch"], "final": _compact_final(m["final"])}

    def bank(self) -> dict[str, Any]:
        from userip.bank import build_bank

        with build_bank(self.out / "profiles", self.out / "bank.sqlite") as b:
            return {"users": b.meta().get("n_users")}

    def explain(self) -> dict[str, Any]:
        from userip.explain import explain

        e = explain(self.out / "profiles", self.out / "data", llm=self.llm, out=self.out / "explanations.json",
                    **self.cfg["explain"])
        return {"profiles": list(e.get("profiles", {}))}

    def profile_config(self):
        """The profiles' config (what they read): from the fitted profiles, else the run config's section."""
        from userip.profile import ProfileConfig
        from userip.profile.api import load_config

        f = self.out / "profiles" / "config.yaml"
        if f.exists() and (read_yaml(f) or {}).get("profile"):
            return load_config(f)
        return ProfileConfig.from_dict({"seed": self.cfg["seed"], **self.cfg["profile"]})

    def baselines(self) -> dict[str, Any]:
        from userip.baselines import content_kmeans_baseline, history_baseline, save_baseline, text_profile_baseline
        from userip.data import load_prepared

        bcfg = dict(self.cfg["baselines"])
        data = load_prepared(self.out / "data")
        cards = _cardinalities(self.out / "profiles")
        pcfg = self.profile_config()
        same = {"behaviour": pcfg.behaviour, "title_year": pcfg.title_year}  # every source reads what profiles read
        info: dict[str, Any] = {}
        needed = _baselines_read(self.cfg["ctr"])
        keys = (("history", "history"), ("content-kmeans", "content_kmeans"), ("text-profile", "text_profile"))
        for name, key in keys:
            if bcfg.get(key, True) and name not in needed:  # no CTR variant reads it: don't pay for it
                bcfg[key] = False
                spec = self.cfg["ctr"].get("variants", "default")
                info[name] = {"skipped": f"no variant of ctr.variants={spec!r} reads it"}
        if bcfg.pop("history", True):  # the pooled states are the profile fit's (cached): seconds, not minutes
            f = history_baseline(data, self.llm, cards, pcfg, seed=self.cfg["seed"], progress=self.progress)
            save_baseline(f, self.out / "baselines" / "history", overwrite=True)
            info["history"] = f.meta
        if bcfg.pop("content_kmeans", True):
            f = content_kmeans_baseline(data, cards, seed=self.cfg["seed"], **same)
            save_baseline(f, self.out / "baselines" / "content-kmeans", overwrite=True)
            info["content-kmeans"] = f.meta
        if bcfg.pop("text_profile", True):
            f = text_profile_baseline(data, self.llm, cards, seed=self.cfg["seed"],
                                      cache_dir=self.out / "baselines" / "cache", **same, **bcfg)
            save_baseline(f, self.out / "baselines" / "text-profile", overwrite=True)
            info["text-profile"] = f.meta
        return info

    def ctr(self) -> dict[str, Any]:
        from userip.ctr import train_ctr

        c = dict(self.cfg["ctr"])
        dirs = [self.out / "baselines" / n for n in ("history", "text-profile", "content-kmeans")
                if (self.out / "baselines" / n).exists()]
        df = train_ctr(self.out / "data", self.out / "bank.sqlite", self.out / "profiles", out=self.out / "ctr",
                       overwrite=True, progress=self.progress, baselines=dirs, **c)
        return {"runs": int(len(df) // max(df["slice"].nunique(), 1)),
                "winners": {k: v["winners"] for k, v in _winners(df).items()}}

    def probe(self) -> dict[str, Any]:
        from userip.baselines import load_baseline
        from userip.data import load_prepared
        from userip.explain import activity_frame, id_space_size, permuted_ids, probe, probe_markdown
        from userip.explain.probe import nothing_to_probe_markdown, probe_targets

        data = load_prepared(self.out / "data")
        # the dataset's own side features (or probe.targets): a log without any gets a note, not a crash
        targets, skipped = probe_targets(data.users, data.config.side_features, self.cfg["probe"].get("targets"))
        if not targets:
            write_json(self.out / "probe.json", [])
            _write_text(self.out / "probe.md", nothing_to_probe_markdown(skipped) + "\n")
            return {"rows": 0, "targets": [], "skipped": skipped}
        ids = pd.read_parquet(self.out / "profiles" / "profile_ids.parquet")
        ids = ids.drop(columns=["user_id"])
        seed = self.cfg["seed"]
        tables = {"profile IDs": ids, "permuted IDs": permuted_ids(ids, seed),
                  "activity buckets": activity_frame(data, id_space_size(ids), users=ids["user_idx"])}
        for name, label in (("history", "history-state IDs"), ("text-profile", "text-profile IDs"),
                            ("content-kmeans", "content k-means IDs")):
            d = self.out / "baselines" / name
            if d.exists():
                b = load_baseline(d).ids
                tables[label] = b[b["user_idx"].isin(ids["user_idx"])].drop(columns=["user_id"])
        df = probe(tables, data.users, targets, seed=seed)
        write_json(self.out / "probe.json", df.to_dict(orient="records"))
        _write_text(self.out / "probe.md", probe_markdown(df) + "\n")
        return {"rows": len(df), "targets": targets, "skipped": skipped}

    def report(self) -> dict[str, Any]:
        from userip.report import build_report

        paths = build_report(self.out)
        return {"files": [str(p.relative_to(self.out)) for p in paths]}


def _write_text(path: Path, text: str) -> None:
    from userip.io import atomic_path

    with atomic_path(path) as tmp:  # a report read mid-write never sees half a table
        tmp.write_text(text)


def _winners(df: pd.DataFrame) -> dict[str, Any]:
    from userip.ctr import winners

    lifts = df.attrs.get("lifts")
    return winners(lifts) if lifts is not None and not lifts.empty else {}


def _cardinalities(profiles_dir: Path) -> dict[str, int]:
    conf = read_yaml(profiles_dir / "config.yaml")
    return {p["name"]: int(p["codebook_size"]) for p in conf["profiles"]}


def _compact_final(final: dict[str, Any]) -> dict[str, Any]:
    keep = ("heldout", "gap_own_vs_mean", "gap_own_vs_mean_user", "gap_own_vs_shuffled")
    return {k: final[k] for k in keep if k in final}


def run(config: str | Path | None = None, out: str | Path | None = None, *, quick: bool = False,
        progress: bool = True, stages: tuple[str, ...] = STAGES, overwrite: bool = False,
        **overrides: Any) -> dict[str, Any]:
    """Run the pipeline into ``out`` (default ``runs/<config name>``); returns the run record (run.json).

    ``out`` must be new, empty or a run dir userip wrote: an unfinished or finished run continues (stages
    whose key matches are skipped); ``overwrite=True`` first removes what the run wrote and starts afresh.
    Files userip did not write are never removed.
    """
    cfg = load_run_config(config, quick, **overrides)
    check_sections(cfg)
    out = Path(out) if out is not None else Path("runs") / cfg["name"]
    claimed = claim_output_dir(out, "run", overwrite=overwrite)
    record_path = out / "run.json"
    record = read_json(record_path) if record_path.exists() else {}
    done = record.get("stages", {})
    write_yaml(out / "config.yaml", cfg)
    runner = Runner(cfg, out, progress)
    keys: dict[str, str] = {}
    t_run = time.perf_counter()
    for stage in STAGES:
        keys[stage] = _key(cfg, stage, keys)
        if stage not in stages:
            continue
        prev = done.get(stage, {})
        if prev.get("key") == keys[stage] and prev.get("status") == "done":
            console.print(f"[dim]stage {stage}: up to date, skipped[/]")
            continue
        console.rule(f"stage {stage}")
        fn: Callable[[], dict[str, Any]] = getattr(runner, stage)
        with measure() as usage:
            info = fn()
        release_memory()
        done[stage] = {"key": keys[stage], "status": "done", "wall_s": round(usage.wall_s, 2),
                       "peak_rss_mb": round(usage.peak_rss_mb, 1), "info": info,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # later stages' old results no longer match: their keys change, so they rerun
        record = {"name": cfg["name"], "config": cfg, "stages": done}
        write_json(record_path, record)
        console.print(f"stage {stage}: {usage.wall_s:.1f}s, peak RSS {usage.peak_rss_mb:.0f} MB")
    record = {"name": cfg["name"], "config": cfg, "stages": done,
              "wall_s_this_invocation": round(time.perf_counter() - t_run, 1)}
    write_json(record_path, record)
    if all(done.get(s, {}).get("status") == "done" and done[s].get("key") == keys[s] for s in STAGES):
        claimed.complete()
    return record


def _baselines_read(ctr_cfg: dict[str, Any]) -> set[str]:
    """The saved baselines the CTR table will read: every one for ``variants: all``; for ``default`` only the
    competitor's (the history states unless ``competitor`` names another); for a list, those its names use."""
    spec = ctr_cfg.get("variants", "default")
    prefixes = {"hist": "history", "text": "text-profile", "content": "content-kmeans"}
    if spec == "all":
        return set(prefixes.values())
    if spec == "default" or spec is None:
        names = [ctr_cfg.get("competitor") or "+hist-ids"]
    else:
        names = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for n in names:
        for part in str(n).strip().lstrip("+").split("+"):
            head = part.split("-")[0]
            if head in prefixes:
                out.add(prefixes[head])
    return out
