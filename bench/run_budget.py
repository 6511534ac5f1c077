"""Time and memory budget of the main job: `userip run` (default and --quick), per stage and in total.

    python bench/run_budget.py                      # configs/ml-100k.yaml: the default run, then --quick
    python bench/run_budget.py --quick-only
    python bench/run_budget.py --config my.yaml --run-dir runs/budget
    python bench/run_budget.py --smoke              # tiny generated world + tiny model, --quick only (~30 s)
    python bench/run_budget.py --smoke --variants quick,default   # both variants on the tiny world (~1 min)

Each variant runs as a child process (``python -m userip.cli run --config C --out RUN_DIR/<variant>
[--quick]``), so the memory figures are the job's own: per stage, the wall time and peak RSS that the job
records in RUN/run.json (userip.monitor, sampled every 0.1 s); in total, the child's wall time (process start
to exit, imports included) and the peak RSS of the child and all its descendants sampled here every 0.1 s.
Targets (default run): <= 20 min wall and <= 4 GiB peak RSS; the memory target is also checked for --quick.
A run dir that already holds a run.json is refused: its stages would be skipped as up to date and the timings
would be meaningless. Shared caches (the dequantised model, the ML-100K download) are not per run: the JSON
records whether they were already warm.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ROOT,
    log,
    machine_info,
    out_path,
    temp_dir,
    verdict,
    write_result,
    write_world,
)

NAME = "run_budget"
TARGET_WALL_S = 20 * 60
TARGET_RSS_MB = 4 * 1024


def smoke_config(d: Path) -> Path:
    """A tiny run config: generic CSV world, tiny random Llama saved as an HF dir, minimal stage settings."""
    import yaml

    from userip.llm import tiny_llm

    world = write_world(d / "world", n_users=24, n_items=40)
    llm = tiny_llm(seed=0)
    llm.model.save_pretrained(d / "tiny")
    llm.tokenizer.save_pretrained(d / "tiny")
    cfg = {
        "seed": 0,
        "model": str(d / "tiny"),
        "data": {"interactions": str(world / "inter.csv"), "items": str(world / "items.csv"),
                 "users": str(world / "users.csv"), "side_features": ["age", "gender", "occupation"]},
        "profile": {"epochs": 1, "batch_users": 8, "max_tokens": 32, "inner_steps": 1, "kmeans_iters": 1},
        "ctr": {"backbones": ["dcn"], "seeds": 1, "max_epochs": 2, "batch_size": 256},
        "baselines": {"max_new_tokens": 4, "batch_size": 8},
        "explain": {"max_new_tokens": 4},
        "quick": {"users": 16},
    }
    path = d / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def run_variant(config: Path | None, run_dir: Path, quick: bool, extra_env: dict[str, str] | None = None) -> dict:
    """Run one `userip run` child; return its stages, wall time and peak RSS."""
    import psutil

    from userip.io import read_json

    if (run_dir / "run.json").exists():
        raise SystemExit(f"{run_dir} already holds a run (run.json): stages would be skipped; pick another "
                         "--run-dir")
    cmd = [sys.executable, "-m", "userip.cli", "run", "--out", str(run_dir)]
    if config is not None:
        cmd += ["--config", str(config)]
    if quick:
        cmd.append("--quick")
    log(f"[{NAME}] $ {' '.join(cmd)}")
    env = {**os.environ, **(extra_env or {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env, cwd=ROOT)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        p = psutil.Process(child.pid)
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(p))
            done.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = child.wait()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    record = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {}
    stages = {name: {"wall_s": float(st.get("wall_s", 0.0)), "peak_rss_mb": float(st.get("peak_rss_mb", 0.0)),
                     "status": st.get("status")}
              for name, st in record.get("stages", {}).items()}
    stage_peak = max((s["peak_rss_mb"] for s in stages.values()), default=0.0)
    return {"exit_code": rc, "run_dir": str(run_dir), "wall_s": wall,
            "run_wall_s": record.get("wall_s_this_invocation"),
            "stage_wall_sum_s": sum(s["wall_s"] for s in stages.values()),
            "peak_rss_mb": max(peak[0] / 2**20, stage_peak), "sampled_peak_rss_mb": peak[0] / 2**20,
            "stage_peak_rss_mb": stage_peak, "stages": stages, "name": record.get("name")}


def from_existing(run_dir: Path) -> dict:
    """A finished run's own record (RUN/run.json) as a variant: for a default run too long to repeat here."""
    from userip.io import read_json

    record = read_json(run_dir / "run.json")
    stages = {name: {"wall_s": float(st.get("wall_s", 0.0)), "peak_rss_mb": float(st.get("peak_rss_mb", 0.0)),
                     "status": st.get("status")}
              for name, st in record.get("stages", {}).items()}
    wall = sum(s["wall_s"] for s in stages.values())
    peak = max((s["peak_rss_mb"] for s in stages.values()), default=0.0)
    return {"exit_code": 0 if all(s["status"] == "done" for s in stages.values()) else 1, "run_dir": str(run_dir),
            "wall_s": wall, "run_wall_s": record.get("wall_s_this_invocation"), "stage_wall_sum_s": wall,
            "peak_rss_mb": peak, "sampled_peak_rss_mb": None, "stage_peak_rss_mb": peak, "stages": stages,
            "name": record.get("name"), "source": "existing run.json (stage sums; not re-run)"}


def stage_table(v: dict) -> str:
    return ", ".join(f"{k} {s['wall_s']:.1f}s/{s['peak_rss_mb']:.0f}MB" for k, s in v["stages"].items())


def caches_warm() -> dict:
    from userip.paths import cache_dir

    models = cache_dir("models")
    return {"dequantised_model_cache": any(models.glob("*/config.json")),
            "ml100k_cache": any(cache_dir("datasets").glob("ml-100k*/*"))}


def has_quick_section(config: Path | None) -> bool:
    from userip.io import read_yaml
    from userip.run import DEFAULT_CONFIG

    raw = read_yaml(config or DEFAULT_CONFIG) or {}
    return bool(isinstance(raw, dict) and raw.get("quick"))


def summarise(results: dict[str, dict], meta: dict) -> dict:
    d, q = results.get("default"), results.get("quick")
    targets: dict = {"default_wall_s": TARGET_WALL_S, "peak_rss_mb": TARGET_RSS_MB}
    if d is not None:
        targets["default_wall_met"] = d["exit_code"] == 0 and d["wall_s"] <= TARGET_WALL_S
        targets["default_rss_met"] = d["peak_rss_mb"] <= TARGET_RSS_MB
    if q is not None:
        targets["quick_rss_met"] = q["peak_rss_mb"] <= TARGET_RSS_MB
    return {
        "name": NAME,
        "variants": results,
        "default_wall_s": d["wall_s"] if d else None,
        "default_peak_rss_mb": d["peak_rss_mb"] if d else None,
        "quick_wall_s": q["wall_s"] if q else None,
        "quick_peak_rss_mb": q["peak_rss_mb"] if q else None,
        "targets": targets,
        **meta,
        "machine": machine_info("cpu"),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny generated world + tiny model, temp run dir")
    p.add_argument("--out", help=f"result JSON (default bench/results/{NAME}.json)")
    p.add_argument("--config", help="run config (default configs/ml-100k.yaml)")
    p.add_argument("--run-dir", help="where the runs go, as RUN_DIR/default and RUN_DIR/quick "
                                     "(default runs/bench-budget-<time>; a temp dir with --smoke)")
    p.add_argument("--quick-only", action="store_true", help="only `userip run --quick`")
    p.add_argument("--default-from", help="take the default variant from this finished run dir's run.json "
                                          "instead of running it again (it takes ~50 min here)")
    p.add_argument("--variants", help="comma list out of quick,default (default: both; quick only with --smoke)")
    a = p.parse_args(argv)
    if a.variants:
        a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        bad = sorted(set(a.variants) - {"quick", "default"})
        if bad:
            p.error(f"--variants: unknown {bad}; expected quick and/or default")
    else:
        a.variants = ["quick"] if (a.quick_only or a.smoke) else ["default", "quick"]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    config = Path(a.config).resolve() if a.config else None
    if a.smoke:
        tmp = temp_dir("run-budget")
        config = config or smoke_config(tmp)
        run_root = Path(a.run_dir).resolve() if a.run_dir else tmp / "runs"
    else:
        stamp = time.strftime("bench-budget-%Y%m%d-%H%M%S")
        run_root = Path(a.run_dir).resolve() if a.run_dir else ROOT / "runs" / stamp
    warm = caches_warm()
    variants = a.variants
    quick_section = has_quick_section(config)
    if "quick" in variants and not quick_section:
        log(f"[{NAME}] WARNING: {config or 'configs/ml-100k.yaml'} has no `quick:` section, so `userip run --quick` "
            "does the same work as the default run (only the name differs)")
    results: dict[str, dict] = {}
    meta = {"caches_warm_before": warm, "config": {
        "smoke": a.smoke, "config": str(config) if config else "configs/ml-100k.yaml (default)",
        "run_dir": str(run_root), "variants": variants, "config_has_quick_section": quick_section,
        "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}}
    path = out_path(NAME, a.out)
    if a.default_from:
        results["default"] = from_existing(Path(a.default_from).resolve())
        variants = [v for v in variants if v != "default"]
        result = summarise(results, meta)
        write_result(path, result)
    for v in variants:
        # smoke: one thread, so a busy shared machine does not turn OpenMP spin-waits into minutes
        extra = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if a.smoke else None
        res = run_variant(config, run_root / v, quick=(v == "quick"), extra_env=extra)
        results[v] = res
        log(f"[{NAME}] {v}: exit {res['exit_code']}, {res['wall_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB | "
            f"{stage_table(res)}")
        result = summarise(results, meta)
        write_result(path, result)  # after each variant: a long run's first half is kept if the rest is cut
        if res["exit_code"] != 0:
            log(f"[{NAME}] {v} run failed (exit {res['exit_code']}); see the output above")
            break
    targets = result["targets"]
    parts = []
    for v, res in results.items():
        s = f"{v} {res['wall_s']:.1f} s / {res['peak_rss_mb']:.0f} MB"
        if res["exit_code"] != 0:
            s += f" (FAILED, exit {res['exit_code']})"
        elif v == "default":
            s += (f" (targets <= {TARGET_WALL_S / 60:.0f} min: {verdict(targets['default_wall_met'])}, "
                  f"<= {TARGET_RSS_MB / 1024:.0f} GiB: {verdict(targets['default_rss_met'])})")
        else:
            s += f" (<= {TARGET_RSS_MB / 1024:.0f} GiB: {verdict(targets['quick_rss_met'])})"
        slowest = max(res["stages"].items(), key=lambda kv: kv[1]["wall_s"], default=None)
        if slowest:
            s += f", slowest stage {slowest[0]} {slowest[1]['wall_s']:.1f} s"
        parts.append(s)
    print(f"{NAME}: " + " | ".join(parts) + f" | {path}", flush=True)
    return 0 if all(r["exit_code"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
