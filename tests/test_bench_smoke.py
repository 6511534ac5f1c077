"""The benchmark scripts in bench/ run end to end in their --smoke mode (tiny model, tiny sizes).

Only the shape of the output is checked: one summary line on stdout, a JSON with the expected keys and
positive values. Never timings: these run on shared machines.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

# script -> keys that must be present and > 0 in its JSON
EXPECTED = {
    "em_step": ["naive_step_s", "step_s", "speedup_vs_naive", "naive_bf16_step_s", "speedup_vs_naive_bf16",
                "tokens_per_s", "fraction_of_bf16_peak",
                "fraction_of_fp32_peak", "bf16_peak_tflops", "fp32_peak_tflops"],
    "online": ["lookup_p50_us", "lookup_p99_us", "lookup_p99_us_per_user_batch512", "lookup_users_per_s_batch1",
               "lookup_users_per_s_batch512", "llm_median_s_per_user", "ratio_llm_vs_lookup"],
    "scaling": ["max_peak_rss_mb", "wall_s"],
    "run_budget": ["quick_wall_s", "quick_peak_rss_mb"],
    "profile_infer": ["ms_per_user", "model_load_s", "users"],
}


THREADED = {"em_step", "online", "scaling"}  # scripts with --threads


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Start every script's --smoke at once (one thread each: 2-core CI), then collect them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    d = tmp_path_factory.mktemp("bench")
    procs = {}
    for script in EXPECTED:
        out = d / f"{script}.json"
        cmd = [sys.executable, str(BENCH / f"{script}.py"), "--smoke", "--out", str(out)]
        cmd += ["--threads", "1"] if script in THREADED else []
        cmd += ["--pool-layers", "0,1"] if script == "profile_infer" else []
        with open(d / f"{script}.stdout", "w") as so, open(d / f"{script}.stderr", "w") as se:
            # files, not pipes: a child blocked on a full pipe while another is waited on would hang
            procs[script] = (out, subprocess.Popen(cmd, stdout=so, stderr=se, cwd=BENCH.parent, env=env))
    runs = {}
    try:
        for script, (out, p) in procs.items():
            rc = p.wait(timeout=600)
            runs[script] = (rc, (d / f"{script}.stdout").read_text(), (d / f"{script}.stderr").read_text(), out)
    finally:
        for _, p in procs.values():
            if p.poll() is None:
                p.kill()
    return runs


def _result(smoke_runs, script: str) -> dict:
    rc, stdout, stderr, out = smoke_runs[script]
    assert rc == 0, stderr[-4000:]
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}:"), stdout
    assert str(out) in lines[0]
    return json.loads(out.read_text())


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_bench_smoke(script, smoke_runs):
    res = _result(smoke_runs, script)
    assert res["name"] == script and res["config"]["smoke"] is True
    for key in EXPECTED[script]:
        assert key in res, key
        assert isinstance(res[key], (int, float)) and res[key] > 0, (key, res[key])
    if script == "em_step":
        assert {"cpu", "cores_logical", "torch", "threads"} <= set(res["machine"])
        assert res["flops_per_step"]["total"] > 0 and len(res["times_s"]["ours"]) >= 1
        assert len(res["times_s"]["naive_bf16"]) == len(res["times_s"]["naive"]) >= 1
        assert res["config"]["naive_bf16_dtype"] == "torch.bfloat16"
        nll = res["nll_per_token_last"]  # the bf16 loop computes the same loss as the fp32 one, up to rounding
        assert abs(nll["naive_bf16"] - nll["naive"]) < 0.1 * nll["naive"]
    elif script == "online":
        b = res["bytes_per_user"]
        assert b["ids"] > 0 and b["theta_fp32"] > b["ids"] and b["text_mean_utf8"] >= 0
        assert res["lookup_batch512"]["batch"] == 512
    elif script == "scaling":
        assert len(res["by_length"]) >= 2 and len(res["by_batch"]) >= 2
        assert isinstance(res["exponent_time_vs_length"], float)  # sign is noise at smoke sizes
        assert all(p["step_s"] > 0 and p["peak_rss_mb"] > 0 for p in res["points"])
        assert Path(res["plot"]).is_file() and Path(res["plot"]).stat().st_size > 0
    elif script == "run_budget":
        q = res["variants"]["quick"]
        assert q["exit_code"] == 0 and q["stages"]
        assert all(s["wall_s"] >= 0 and s["peak_rss_mb"] > 0 for s in q["stages"].values())
    elif script == "profile_infer":
        pc = res["pooling_ms_per_user"]
        assert pc["windows"] > 0 and all(pc[k] > 0 for k in ("last", "block1", "sdpa_last"))
