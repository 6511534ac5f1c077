"""Readable summaries of a profile fit (terminal tables; the markdown/HTML report builds on the same data)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table


def summary_table(metrics: dict[str, Any]) -> Group:
    """Per-epoch held-out NLL (the selection half, or every variant), the best epoch's full evaluation with its
    95% intervals on the report half and the ceiling, then code usage of the best epoch."""
    t = Table(title=f"profile fit ({metrics.get('inference', 'em')}): {metrics.get('n_users', '?')} users, "
                    f"best epoch {metrics.get('best_epoch')}",
              caption="held-out NLL per token; gap = mean - own (> 0: the personal part predicts the future)")
    for col in ("ep", "train", "own", "shuf", "mean", "code", "gap", "s"):
        t.add_column(col, justify="right", no_wrap=True)
    for m in metrics.get("epochs", []):
        h = m.get("heldout", {})
        t.add_row(
            str(m["epoch"]), f"{m['train_nll']:.3f}",
            *(f"{h[k]:.4f}" if k in h else "-" for k in ("own", "shuffled", "mean", "codeword")),
            f"{m.get('gap_own_vs_mean', float('nan')):+.4f}", f"{m.get('wall_s', 0):.0f}",
        )
    parts: list[Any] = [t]
    final = metrics.get("final", {})
    gaps = final.get("report", {}).get("gaps", {})
    if gaps:
        applied = final.get("applied_scale", 1.0)
        g = Table(title=f"best epoch, report half ({final['report']['users']} users), 95% bootstrap intervals"
                        + (f"; own = the published profile, personal part x{applied:g}" if applied != 1.0 else ""))
        for col in ("comparison", "nats/token", "95% CI", "per item", "rating tokens", "verdict"):
            g.add_column(col, justify="right", no_wrap=True)
        for name, x in gaps.items():
            if "token" not in x:
                continue
            ci = f"[{x.get('lo', float('nan')):+.4f}, {x.get('hi', float('nan')):+.4f}]"
            g.add_row(name, f"{x['token']:+.4f}", ci,
                      f"{x['item']:+.4f}", f"{x['rating_token']:+.4f}" if "rating_token" in x else "-",
                      x.get("verdict", "-"))
        parts.append(g)
    c = metrics.get("ceiling") or {}
    if c.get("personal_gain") is not None:
        cap = final.get("captured")
        parts.append(f"ceiling (own vs another's history in context, report half): {c['history_own']:.4f} vs "
                     f"{c['history_other']:.4f}, personal gain {c['personal_gain']:+.4f} nats/token; captured "
                     f"{cap:.0%}" + (f", {final['captured_calibrated']:.0%} with the personal part a further x"
                                     f"{final['personal_scale']:g}" if "captured_calibrated" in final else "")
                     if cap is not None else "")
    c = Table(title="codes (best epoch)")
    for col in ("profile", "users per code", "perplexity", "dead", "NMI with activity"):
        c.add_column(col, justify="right", no_wrap=True)
    for name, s in final.get("codes", {}).items():
        c.add_row(name, " ".join(map(str, s["usage"])), f"{s['perplexity']:.2f}", str(s["dead"]),
                  f"{s['nmi_activity']:.3f}")
    parts.append(c)
    st = metrics.get("student")
    if st:  # the new-user encoder: how often its IDs equal the fitted ones on users it never saw
        agree = ", ".join(f"{k} {v['agreement']:.0%} (kappa {v['kappa']:.2f})"
                          for k, v in st["oof_id_agreement"].items())
        parts.append(f"new-user student (ridge alpha {st['alpha']:g}, {st['students']} folds): its IDs equal the "
                     f"fitted ones for {agree} of users it never saw")
    refit = metrics.get("refit")
    if refit:  # `--previous`: how many users kept their ID after the codes were relabelled to the old ones
        r = Table(title=f"refit of {refit['previous']}: IDs relabelled to keep the previous fit's")
        for col in ("profile", "matched by", "shared users", "changed ID", "without matching", "kept"):
            r.add_column(col, justify="right", no_wrap=True)
        for name, x in refit["profiles"].items():
            if x.get("method") == "none":
                r.add_row(name, "-", "-", "-", "-", x.get("reason", "-"))
                continue
            kept = f"{x['agreement']:.0%}" if x.get("agreement") is not None else "-"
            r.add_row(name, x["method"], str(x["shared"]), str(x["changed"]), str(x["changed_raw"]), kept)
        parts.append(r)
    return Group(*parts)
