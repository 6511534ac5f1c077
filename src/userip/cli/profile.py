"""`userip profile`: fit soft user profiles, infer IDs for new users, count codes."""

from __future__ import annotations

from pathlib import Path

import typer

from userip.cli.common import _friendly, console, profile_app
from userip.errors import UseripError


@profile_app.command("fit")
@_friendly
def profile_fit(
    data: Path = typer.Option(..., "--data", help="Prepared data directory (userip data prepare)."),
    out: Path = typer.Option(..., "--out", help="Output PROFILES directory (resumes from its checkpoints)."),
    model: str = typer.Option("smollm2-135m", "--model", help="Bundled model name, local HF dir or .gguf file."),
    config: Path | None = typer.Option(None, "--config", help="YAML config (its `profile:` section)."),
    epochs: int | None = typer.Option(None, "--epochs"),
    max_users: int | None = typer.Option(None, "--max-users", help="Fit a seeded random subset of users."),
    seed: int | None = typer.Option(None, "--seed"),
    mode: str | None = typer.Option(None, "--mode", help="em (default) or joint (reference code)."),
    table: str | None = typer.Option(None, "--table", help="residual (default) or plain (reference code)."),
    inference: str | None = typer.Option(
        None, "--inference",
        help="amortised (a shared map reads each user's history), em (per-user E-step), hybrid (E-step from the map).",
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch threads (default: torch's choice)."),
    nproc: int = typer.Option(1, "--nproc", help="Shard users over N processes (torchrun; gloo on CPU)."),
    previous: Path | None = typer.Option(
        None, "--previous", help="A previous PROFILES dir this refit keeps IDs aligned with (Hungarian matching)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a finished PROFILES dir in --out (checkpoints included; never other files)."
    ),
) -> None:
    """Fit soft profiles on the train split and write profiles, codebooks, IDs and metrics (held-out NLL own /
    shuffled / mean / codeword with 95% intervals, and the in-context ceiling).

    An unfinished --out (a killed fit) resumes from its checkpoints, and so does a finished one fitted with
    the same config (to add --epochs); any other finished --out needs --overwrite."""
    from userip.profile import fit_profiles
    from userip.profile.report import summary_table

    if nproc > 1:
        from userip.profile.fit import launch

        args = ["--data", str(data), "--out", str(out), "--model", model]
        for flag, value in (("--config", config), ("--epochs", epochs), ("--max-users", max_users),
                            ("--seed", seed), ("--threads", threads), ("--previous", previous)):
            if value is not None:
                args += [flag, str(value)]
        if mode not in (None, "em") or table not in (None, "residual") or inference in ("amortised", "hybrid"):
            raise UseripError("--nproc > 1 supports --inference em, --mode em with --table residual only")
        claimed = _claim_profiles(out, overwrite, nproc, config, epochs=epochs, max_users=max_users, seed=seed,
                                  threads=threads)
        rc = launch(nproc, args)
        if rc == 0:
            claimed.complete()
        raise typer.Exit(rc)

    claimed = _claim_profiles(out, overwrite, nproc, config, epochs=epochs, max_users=max_users, seed=seed,
                              mode=mode, table=table, threads=threads, inference=inference)
    metrics = fit_profiles(data, out, model=model, config=config, epochs=epochs, max_users=max_users,
                           seed=seed, mode=mode, table=table, threads=threads, inference=inference,
                           previous=previous)
    claimed.complete()
    console.print(summary_table(metrics))
    console.print(f"wrote {out} in {metrics['wall_s']:.0f}s, peak RSS {metrics['peak_rss_mb']:.0f} MB")


def _claim_profiles(out: Path, overwrite: bool, nproc: int, config: Path | None, **overrides):
    """Claim --out for a fit; a finished PROFILES dir whose checkpoint has this config is continued."""
    import json

    from userip.io import claim_output_dir, read_json, read_marker
    from userip.profile.api import load_config

    marker = read_marker(out) if Path(out).is_dir() else None
    last = Path(out) / "checkpoints" / "last.json"
    if not overwrite and marker and marker["kind"] == "profiles" and marker.get("complete") and last.is_file():
        meta = read_json(last)

        def comparable(d):
            d = json.loads(json.dumps(d, default=str))
            return {k: v for k, v in d.items() if k not in ("epochs", "patience", "threads")}

        from userip.profile.checkpoint import comparable_config

        saved = meta.get("config") or {}
        now = comparable_config(load_config(config, **overrides), saved)
        if comparable(saved) == comparable(now) and meta.get("world", 1) == nproc:
            return claim_output_dir(out, "profiles", overwrite=True, clear=False)  # continue, remove nothing
    return claim_output_dir(out, "profiles", overwrite=overwrite)


@profile_app.command("infer")
@_friendly
def profile_infer(
    run: Path = typer.Option(..., "--run", help="A fitted PROFILES directory."),
    data: Path = typer.Option(..., "--data", help="Prepared data holding the new users' behaviour."),
    users: list[str] = typer.Option(..., "--users", help="Dataset user ids (repeat --users, or space-separate)."),
    bank: str | None = typer.Option(None, "--bank", help="Upsert the IDs into this feature bank."),
    encoder: str = typer.Option(
        "auto", "--encoder",
        help="amortised fits: llm (read the history windows, as the fit did) | student (each interaction on its "
             "own, through the fit's distilled student) | auto (the student where the fit has one)."),
) -> None:
    """IDs for new users without retraining: LLM, shared prompt and codebooks stay frozen."""
    from rich.table import Table

    from userip.profile import infer_profiles

    ids = [u for arg in users for u in arg.split()]
    out = infer_profiles(run, data, ids, bank=bank, encoder=encoder)
    t = Table(title=f"inferred profiles ({out.attrs['seconds_per_user']:.2f} s per user)")
    for c in out.columns:
        t.add_column(c, justify="right")
    for row in out.itertuples(index=False):
        t.add_row(*map(str, row))
    console.print(t)
    if bank:
        console.print(f"upserted {len(out)} users into {bank}")


@profile_app.command("distil")
@_friendly
def profile_distil(
    profiles: Path = typer.Option(..., "--profiles", help="A fitted amortised PROFILES directory."),
    data: Path = typer.Option(..., "--data", help="The prepared data it was fitted on."),
) -> None:
    """Add the cheap new-user encoder (profile.student: item) to an amortised fit; fitted IDs do not change."""
    from userip.profile import distil_profiles

    m = distil_profiles(profiles, data)
    agree = ", ".join(f"{k} kappa {v['kappa']:.2f} ({v['agreement']:.0%} same)"
                      for k, v in m["oof_id_agreement"].items())
    console.print(f"student: ridge alpha {m['alpha']:g} on {m['users']} users; its IDs vs the fitted ones on "
                  f"users it did not see: {agree}")


@profile_app.command("ids")
@_friendly
def profile_ids(profiles: Path = typer.Argument(..., help="A PROFILES directory.")) -> None:
    """Print how many users hold each code, per profile."""
    from rich.table import Table

    from userip.profile import id_counts

    for name, counts in id_counts(profiles).items():
        t = Table(title=f"{name}")
        t.add_column("code", justify="right")
        t.add_column("users", justify="right")
        for code, n in counts.items():
            t.add_row(str(code), str(n))
        console.print(t)


@profile_app.command("compare")
@_friendly
def profile_compare(
    a: Path = typer.Argument(..., help="A PROFILES directory."),
    b: Path = typer.Argument(..., help="Another PROFILES directory (another LLM, seed or refit)."),
    permutations: int = typer.Option(1000, "--permutations", help="Label permutations for the chance NMI."),
    seed: int = typer.Option(0, "--seed"),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the comparison as JSON."),
) -> None:
    """How much two fits' IDs agree per profile: NMI and AMI beside the NMI of permuted IDs (chance)."""
    from rich.table import Table

    from userip.io import write_json
    from userip.profile.compare import compare_ids

    res = compare_ids(a, b, permutations=permutations, seed=seed)
    t = Table(title=f"ID agreement over {res['users']} users")
    for c in ("profile", "codes a/b", "NMI", "NMI permuted (mean, p95)", "AMI", "p"):
        t.add_column(c, justify="right")
    for name, r in res["profiles"].items():
        chance = (f"{r['nmi_permuted_mean']:.3f}, {r['nmi_permuted_p95']:.3f}" if permutations else "-")
        p = f"{r['p_value']:.3g}" if permutations else "-"
        t.add_row(name, f"{r['codes_a']}/{r['codes_b']}", f"{r['nmi']:.3f}", chance, f"{r['ami']:.3f}", p)
    console.print(t)
    if json_out is not None:
        write_json(json_out, res)
        console.print(f"wrote {json_out}")
