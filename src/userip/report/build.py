"""Assemble RUN/report.md and RUN/report.html from the files the stages wrote (nothing is recomputed)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from userip.io import atomic_path, read_json, read_yaml
from userip.report import plots


def _read(path: Path) -> Any:
    if not path.exists():
        return None
    return read_json(path) if path.suffix == ".json" else path.read_text()


def headline(run_dir: str | Path) -> list[str]:
    """The answers a reader wants first, each stated with its control."""
    run_dir = Path(run_dir)
    lines = []
    metrics = _read(run_dir / "profiles" / "metrics.json")
    if metrics and metrics.get("final", {}).get("heldout"):
        lines.append(profile_headline(metrics))
    res = _read(run_dir / "ctr" / "results.json")
    if res and res.get("summary"):  # written with the paired lifts: the CTR verdict, stated with its controls
        lines += [f"CTR: {s}" for s in res["summary"]]
    return lines


def profile_headline(metrics: dict[str, Any]) -> str:
    """The profile verdict: it follows the 95% interval of own vs mean on the report half of the evaluation
    users, never the sign of a point gap, and is measured against the in-context ceiling."""
    f = metrics["final"]
    h = f["heldout"]
    g = f.get("report", {}).get("gaps", {})
    om, osh = g.get("own_vs_mean", {}), g.get("own_vs_shuffled", {})
    if "lo" not in om:  # a fit from before intervals: point gaps only
        personal = f["gap_own_vs_mean"] > 0 and f["gap_own_vs_shuffled"] > 0
        verdict = "personal signal" if personal else "no personal signal"
        return (f"**Profiles ({verdict}, no interval)**: held-out NLL/token own {h['own']:.4f} vs population mean "
                f"{h['mean']:.4f} (gap {f['gap_own_vs_mean']:+.4f}), vs another user's {h['shuffled']:.4f}.")
    verdict = "personal signal" if om["lo"] > 0 else "no personal signal"
    applied = f.get("applied_scale", 1.0)
    own = "own" if applied == 1.0 else \
        f"own (the published profile: personal part x{applied:g}, chosen on the selection half)"
    text = (f"**Profiles ({verdict})**: on {om['users']} held-out report users, {own} beats the population prompt by "
            f"{om['token']:+.4f} nats/token [{om['lo']:+.4f}, {om['hi']:+.4f}] ({om['item']:+.4f} per item) and "
            f"another user's profile by {osh.get('token', float('nan')):+.4f} "
            f"[{osh.get('lo', float('nan')):+.4f}, {osh.get('hi', float('nan')):+.4f}]")
    if om.get("rating_share") is not None:
        text += f"; {om['rating_share']:.0%} of the gain is on rating tokens"
    c = metrics.get("ceiling") or {}
    if c.get("personal_gain"):
        text += (f". Ceiling (own vs another's history in context): {c['personal_gain']:+.4f} nats/token; "
                 f"the profile captures {f.get('captured', 0):.0%} of it")
        if f.get("personal_scale", 1.0) != 1.0:
            cal = g.get("calibrated_vs_mean", {})
            text += (f" ({f.get('captured_calibrated', 0):.0%} with the personal part scaled by a further "
                     f"{f['personal_scale']:g}: {cal.get('token', float('nan')):+.4f} "
                     f"[{cal.get('lo', float('nan')):+.4f}, {cal.get('hi', float('nan')):+.4f}])")
    return text + "."


def _img(path: Path, run_dir: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(run_dir).as_posix()})"


def build_report(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    pdir = run_dir / "plots"
    record = _read(run_dir / "run.json") or {}
    cfg = record.get("config") or (read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else {})
    parts: list[str] = [f"# userip report: {cfg.get('name', run_dir.name)}", ""]
    parts += ["## Headline", ""] + [f"- {line}" for line in headline(run_dir)] + [""]

    parts += ["## Configuration", "", "```yaml", _yaml(cfg), "```", ""]
    stats = _read(run_dir / "data" / "stats.json")
    if stats:
        from userip.data import format_stats

        parts += ["## Data", "", "```", format_stats(stats), "```", ""]

    metrics = _read(run_dir / "profiles" / "metrics.json")
    if metrics and metrics.get("epochs"):
        parts += ["## Profiles", "", _profile_table(metrics), ""]
        if all("heldout" in m for m in metrics["epochs"]):
            png = plots.em_curves(metrics["epochs"], pdir / "em_curves.png", metrics.get("ceiling"))
            parts.append(_img(png, run_dir, "profile curves"))
        codes = metrics.get("final", {}).get("codes")
        if codes:
            parts += ["", _img(plots.code_usage(codes, pdir / "code_usage.png"), run_dir, "code usage"), ""]
            parts += ["| profile | users per code | perplexity | dead | NMI with activity quartile |",
                      "|---|---|---|---|---|"]
            for name, c in codes.items():
                parts.append(f"| {name} | {' '.join(map(str, c['usage']))} | {c['perplexity']:.2f} | {c['dead']} "
                             f"| {c['nmi_activity']:.3f} |")
            parts.append("")

    res = _read(run_dir / "ctr" / "results.json")
    md = _read(run_dir / "ctr" / "results.md")
    if res and res.get("runs"):
        parts += ["## CTR", ""]
        if res.get("lifts"):
            lifts = pd.DataFrame(res["lifts"]).astype({k: float for k in ("d_auc", "d_auc_low", "d_auc_high")})
            parts += [_img(plots.ctr_forest(lifts, pdir / "ctr_forest.png"), run_dir, "CTR paired lifts"), ""]
        if md:
            parts += [_demote(md), ""]

    probe = _read(run_dir / "probe.md")
    if probe:
        parts += ["## Validity probe (demographics the profiler never saw)", "", probe, ""]

    expl = _read(run_dir / "explanations.json")
    if expl:
        from userip.explain import explanations_markdown

        parts += ["## Explanations", "", _demote(explanations_markdown(expl)), ""]

    stages = record.get("stages")
    if stages:
        parts += ["## Cost per stage", "", "| stage | wall s | peak RSS MB |", "|---|---|---|"]
        parts += [f"| {k} | {v.get('wall_s', 0):.1f} | {v.get('peak_rss_mb', 0):.0f} |" for k, v in stages.items()]
        total = sum(v.get("wall_s", 0) for v in stages.values())
        parts += [f"| **total** | {total:.1f} | {max(v.get('peak_rss_mb', 0) for v in stages.values()):.0f} |", ""]
        parts.append(_img(plots.stage_costs(stages, pdir / "stage_costs.png"), run_dir, "stage costs"))
    text = "\n".join(parts) + "\n"
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    with atomic_path(md_path) as tmp:
        tmp.write_text(text)
    with atomic_path(html_path) as tmp:
        tmp.write_text(_html(text, run_dir, cfg.get("name", run_dir.name)))
    return [md_path, html_path, *sorted(pdir.glob("*.png"))]


def _profile_table(metrics: dict[str, Any]) -> str:
    rows = ["| epoch | train NLL | held-out own | shuffled | mean | codeword | mean − own (report half, 95% CI) "
            "| captured | s |", "|---|---|---|---|---|---|---|---|---|"]
    for m in metrics["epochs"]:
        h = m.get("heldout", {})
        cells = [f"{h[k]:.4f}" if k in h else "–" for k in ("own", "shuffled", "mean", "codeword")]
        g = m.get("report", {}).get("gaps", {}).get("own_vs_mean", {})
        gap = (f"{g['token']:+.4f} [{g['lo']:+.4f}, {g['hi']:+.4f}]" if "lo" in g
               else f"{m.get('gap_own_vs_mean', float('nan')):+.4f}")
        cap = f"{m['captured']:.0%}" if m.get("captured") is not None else "–"
        rows.append(f"| {m['epoch']} | {m['train_nll']:.4f} | " + " | ".join(cells)
                    + f" | {gap} | {cap} | {m.get('wall_s', 0):.0f} |")
    rows.append("")
    rows.append(f"Best epoch {metrics.get('best_epoch')} of {len(metrics['epochs'])} (chosen on the selection half); "
                f"{metrics.get('n_users')} users, inference {metrics.get('inference', 'em')}; held-out = each "
                "evaluation user's first validation-period windows.")
    c = metrics.get("ceiling") or {}
    if c.get("personal_gain") is not None:
        gi = c.get("gain", {})
        rows.append(f"Ceiling on {c.get('users')} report users: own history in context {c['history_own']:.4f}, "
                    f"another user's {c['history_other']:.4f}: personal gain {c['personal_gain']:+.4f} nats/token "
                    f"[{gi.get('lo', float('nan')):+.4f}, {gi.get('hi', float('nan')):+.4f}].")
    return "\n".join(rows)


def _demote(md: str) -> str:
    """Nest a stage's own markdown under the report's sections (# -> ###)."""
    return re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", md, flags=re.M)


def _yaml(cfg: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(cfg, default=str)), sort_keys=False).strip()


def _html(md_text: str, run_dir: Path, title: str) -> str:
    """Self-contained page: markdown rendered, PNGs inlined as data URIs."""
    import markdown

    body = markdown.markdown(md_text, extensions=["tables", "fenced_code"])

    def inline(m: re.Match) -> str:
        src = m.group(1)
        p = run_dir / src
        if not p.exists():
            return m.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px}"
             "th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f8fa;padding:1em;overflow-x:auto}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>userip: {title}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")
