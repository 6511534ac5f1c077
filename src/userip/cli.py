"""The `userip` command line. Parses arguments, calls the stage functions (the public Python API), prints.

Stage modules are imported inside each command so `userip --help` stays fast and a broken optional stage
cannot break the others.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from userip.errors import UseripError

app = typer.Typer(help="UserIP-Tuning: LLM-inferred user-profile IDs for CTR models.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare and inspect datasets.", no_args_is_help=True)
profile_app = typer.Typer(help="Fit soft user profiles (EM) and their collaborative IDs.", no_args_is_help=True)
bank_app = typer.Typer(help="Feature bank: user -> profile IDs.", no_args_is_help=True)
ctr_app = typer.Typer(help="CTR models on bank features.", no_args_is_help=True)
export_app = typer.Typer(help="Export a run's CTR rows and profile IDs to other toolkits.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(profile_app, name="profile")
app.add_typer(bank_app, name="bank")
app.add_typer(ctr_app, name="ctr")
app.add_typer(export_app, name="export")

console = Console()
OVERWRITE_HELP = "Replace a finished output of this command in --out (only the files userip wrote there)."
err_console = Console(stderr=True, soft_wrap=True)  # never break a path in an error message


def _friendly(fn):
    """Turn input errors into one readable line and exit code 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UseripError as e:
            err_console.print("[bold red]error:[/]", escape(str(e)))
            raise typer.Exit(2) from None

    return wrapper


# ---------------------------------------------------------------- data
@data_app.command("prepare")
@_friendly
def data_prepare(
    out: Path = typer.Option(..., "--out", help="Output directory: new, empty, or a DATA dir userip wrote."),
    dataset: str | None = typer.Option(None, "--dataset", help="Built-in dataset: ml-100k."),
    interactions: Path | None = typer.Option(None, "--interactions", help="CSV/Parquet interactions file."),
    items: Path | None = typer.Option(None, "--items", help="CSV/Parquet items file."),
    users: Path | None = typer.Option(None, "--users", help="CSV/Parquet users file (optional)."),
    config: Path | None = typer.Option(None, "--config", help="YAML config (column mapping, split)."),
    source: Path | None = typer.Option(None, "--source", help="Local directory holding ML-100K files."),
    name: str | None = typer.Option(
        None, "--name", help="What stats and reports call the dataset (default: ml-100k or the interactions "
        "file's name)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Load a dataset, split it per user in time order, write Parquet tables + stats.json.

    Your own log: --interactions/--items [--users] plus a --config whose `data:` section maps your columns
    (names, 0/1 label or rating, genre separator, split). Every key, its default and two worked examples (a
    binary-label CTR log with titles; a review log): docs/config.md."""
    from userip.data import format_stats, prepare

    data = prepare(
        out, dataset=dataset, interactions=interactions, items=items, users=users, config=config, source=source,
        overwrite=overwrite, name=name,
    )
    console.print(format_stats(data.stats))


@data_app.command("stats")
@_friendly
def data_stats(data_dir: Path = typer.Argument(..., help="A prepared data directory.")) -> None:
    """Print the counts of a prepared dataset."""
    from userip.data import format_stats, load_stats

    console.print(format_stats(load_stats(data_dir)))


# ---------------------------------------------------------------- profile
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
        None, "--inference", help="amortised (a shared map reads each user's history) or em (per-user E-step)."
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
        if mode not in (None, "em") or table not in (None, "residual") or inference == "amortised":
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

        now = load_config(config, **overrides).to_dict()
        if comparable(meta.get("config") or {}) == comparable(now) and meta.get("world", 1) == nproc:
            return claim_output_dir(out, "profiles", overwrite=True, clear=False)  # continue, remove nothing
    return claim_output_dir(out, "profiles", overwrite=overwrite)


@profile_app.command("infer")
@_friendly
def profile_infer(
    run: Path = typer.Option(..., "--run", help="A fitted PROFILES directory."),
    data: Path = typer.Option(..., "--data", help="Prepared data holding the new users' behaviour."),
    users: list[str] = typer.Option(..., "--users", help="Dataset user ids (repeat --users, or space-separate)."),
    bank: str | None = typer.Option(None, "--bank", help="Upsert the IDs into this feature bank."),
) -> None:
    """IDs for new users without retraining: LLM, shared prompt and codebooks stay frozen."""
    from rich.table import Table

    from userip.profile import infer_profiles

    ids = [u for arg in users for u in arg.split()]
    out = infer_profiles(run, data, ids, bank=bank)
    t = Table(title=f"inferred profiles ({out.attrs['seconds_per_user']:.2f} s per user)")
    for c in out.columns:
        t.add_column(c, justify="right")
    for row in out.itertuples(index=False):
        t.add_row(*map(str, row))
    console.print(t)
    if bank:
        console.print(f"upserted {len(out)} users into {bank}")


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


# ---------------------------------------------------------------- end profile


# ---------------------------------------------------------------- bank
@bank_app.command("build")
@_friendly
def bank_build(
    profiles: Path = typer.Option(..., "--profiles", help="PROFILES dir written by `userip profile`."),
    out: str = typer.Option(..., "--out", help="Bank path or URL (sqlite:///path); replaced atomically."),
) -> None:
    """Build the feature bank (user -> profile IDs) from a PROFILES dir."""
    from userip.bank import build_bank

    with build_bank(profiles, out) as bank:
        meta = bank.meta()
    names = ", ".join(f"{p['name']} (K={p['size']})" for p in meta["profiles"])
    console.print(f"built {meta['backend']} bank [bold]{out}[/]: {meta['n_users']} users; profiles {names}")


@bank_app.command("get")
@_friendly
def bank_get(
    users: list[str] = typer.Argument(..., help="User ids (dataset ids, as strings)."),
    bank: str = typer.Option(..., "--bank", help="Bank file path or URL."),
) -> None:
    """Look up profile IDs for users; unknown users show 0 for every profile."""
    from rich.table import Table

    from userip.bank import open_bank

    with open_bank(bank) as b:
        names, ids = b.profile_names, b.get(users)
    table = Table("user_id", *names)
    for uid, row in zip(users, ids, strict=True):
        table.add_row(uid, *(str(int(v)) for v in row))
    console.print(table)


@bank_app.command("info")
@_friendly
def bank_info(bank: str = typer.Option(..., "--bank", help="Bank file path or URL.")) -> None:
    """Show the bank meta and how many users hold each code of each profile."""
    import json

    from rich.table import Table

    from userip.bank import open_bank

    with open_bank(bank) as b:
        meta, counts = b.meta(), b.code_counts()
    info = Table("key", "value", title=f"bank {bank}")
    info.columns[1].overflow = "fold"
    for key, value in meta.items():
        info.add_row(key, value if isinstance(value, str) else json.dumps(value))
    console.print(info)
    n = max(int(meta.get("n_users") or 0), 1)
    for p in meta["profiles"]:
        per_code = counts.get(p["name"], {})
        used = sum(1 for code in per_code if code > 0)
        console.print(f"[bold]{p['name']}[/]: {used}/{p['size']} codes used")
        t = Table("code", "users", "share")
        for code, c in per_code.items():
            t.add_row("0 (unknown)" if code == 0 else str(code), str(c), f"{c / n:.1%}")
        console.print(t)


@bank_app.command("delete")
@_friendly
def bank_delete(
    users: list[str] = typer.Argument(..., help="User ids to delete (dataset ids, as strings)."),
    bank: str = typer.Option(..., "--bank", help="Bank file path or URL."),
    profiles: Path | None = typer.Option(
        None, "--profiles", help="The PROFILES dir the bank was built from: also remove the users' pooled history "
        "states from userip's cache (needs their behaviour in the DATA dir, and loads the fit's tokenizer)."
    ),
    data: Path | None = typer.Option(None, "--data", help="Prepared data dir (default: the one in PROFILES)."),
) -> None:
    """Delete users from the feature bank (an atomic rebuild; they become unknown, ID 0), and with --profiles
    their cached pooled history states too."""
    from userip.bank import delete_users, forget_users

    found = delete_users(bank, users)
    gone = [u for u in users if u not in found]
    console.print(f"deleted {len(found)} user(s) from {bank}" + (f"; not in the bank: {', '.join(gone)}" if gone
                                                                    else ""))
    if profiles is not None:
        n = forget_users(profiles, users, data)
        console.print(f"removed {n} pooled history-state cache entr{'y' if n == 1 else 'ies'}")


# ---------------------------------------------------------------- end bank


# ---------------------------------------------------------------- ctr
@ctr_app.command("train")
@_friendly
def ctr_train(
    data: Path = typer.Option(..., "--data", help="Prepared data directory."),
    bank: str = typer.Option(..., "--bank", help="Feature bank (path or URL)."),
    profiles: Path | None = typer.Option(None, "--profiles", help="Profile run dir: adds the +theta variant."),
    baseline: list[Path] = typer.Option(
        [], "--baseline", help="A saved baseline dir (e.g. RUN/baselines/history): adds its sources (+hist-ids, "
        "+hist-dense, +text-ids, ...). Repeatable."
    ),
    backbones: str | None = typer.Option(None, "--backbones", help="Comma list (default: all five)."),
    seeds: int | None = typer.Option(None, "--seeds", help="Number of seeds (0..N-1), paired across variants."),
    out: Path = typer.Option(..., "--out", help="Output dir: results.json, results.md, predictions.npz, models/."),
    variants: str = typer.Option(
        "default", "--variants", help="default (the headline: base, +ids, +ids-permuted, +activity, +label-rate, "
        "+ids+label-rate, the strongest competitor and its twin), all (every source with its permuted twin), "
        "or a comma list such as base,+ids,+ids-permuted,+theta,+theta-permuted."
    ),
    competitor: str | None = typer.Option(
        None, "--competitor", help="The baseline in the default table (default: +hist-ids when built)."
    ),
    settings: str | None = typer.Option(None, "--settings", help="with_user_id, no_user_id or both (default)."),
    max_epochs: int | None = typer.Option(None, "--max-epochs"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr"),
    bootstrap: int | None = typer.Option(None, "--bootstrap", help="Paired bootstrap replicates (users, seeds)."),
    threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads (default: torch's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Train CTR backbones with the profile IDs, their permuted twins and the controls; print the table.

    Options left out take the CTR stage's defaults (docs/config.md, section `ctr:`)."""
    from userip.ctr import train_ctr

    if threads:
        import torch

        torch.set_num_threads(threads)
    given = {"backbones": backbones, "seeds": seeds, "settings": settings, "max_epochs": max_epochs,
             "batch_size": batch_size, "lr": lr, "bootstrap": bootstrap}
    train_ctr(data, bank, profiles, out=out, variants=variants, overwrite=overwrite, baselines=baseline,
              competitor=competitor, **{k: v for k, v in given.items() if v is not None})
    console.print((out / "results.md").read_text(), markup=False, highlight=False, soft_wrap=True)
# ---------------------------------------------------------------- end ctr


# ---------------------------------------------------------------- explain
@app.command("explain")
@_friendly
def explain_cmd(
    profiles: Path = typer.Argument(..., help="A PROFILES directory (userip profile fit)."),
    data: Path | None = typer.Option(None, "--data", help="Prepared data dir (default: the one in config.yaml)."),
    out: Path | None = typer.Option(None, "--out", help="explanations.json path (default: PROFILES/)."),
    model: str | None = typer.Option(None, "--model", help="LLM (default: the model in config.yaml)."),
    top_k: int = typer.Option(10, "--top-k", help="Nearest vocabulary tokens per code."),
    suffix: str | None = typer.Option(None, "--suffix", help="Text after the profile slots for the phrase."),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", help="Greedy tokens per phrase."),
    min_users: int = typer.Option(5, "--min-users", help="Support for a title: code users who watched it."),
    min_interactions: int = typer.Option(20, "--min-interactions", help="Support for a genre: interactions."),
    probe: bool = typer.Option(False, "--probe", help="Also run the validity probe (user side features)."),
) -> None:
    """Explain each profile code: nearest tokens, a decoded phrase, over-represented genres and titles."""
    from rich.markdown import Markdown

    from userip.explain import DEFAULT_SUFFIX, explain, explanations_markdown

    llm = None
    if model is not None:
        from userip.llm import load_llm

        llm = load_llm(model)
    path = out or profiles / "explanations.json"
    path = path / "explanations.json" if path.is_dir() else path
    expl = explain(profiles, data, llm=llm, top_k=top_k, suffix=suffix or DEFAULT_SUFFIX,
                   max_new_tokens=max_new_tokens, min_users=min_users, min_interactions=min_interactions, out=path)
    text = explanations_markdown(expl)
    if probe:
        from userip.explain import probe_markdown, probe_profiles
        from userip.io import write_json

        table = probe_profiles(profiles, expl["data_dir"])
        expl["probe"] = table.to_dict(orient="records")
        write_json(path, expl)
        text += "\n\n## Validity probe\n\n" + probe_markdown(table) + "\n"
    console.print(Markdown(text))
    console.print(f"wrote {path}")
# ---------------------------------------------------------------- end explain


# ---------------------------------------------------------------- run
@app.command("run")
@_friendly
def run_cmd(
    config: Path | None = typer.Option(None, "--config", help="Run config (default configs/ml-100k.yaml)."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/<config name>)."),
    quick: bool = typer.Option(False, "--quick", help="A small slice for a first look in a few minutes."),
    seed: int | None = typer.Option(None, "--seed", help="Fixes every RNG of every stage."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh: remove what an earlier run wrote in --out (never other files)."
    ),
) -> None:
    """The main job: data -> profiles -> bank -> explain -> baselines -> CTR -> probe -> report.

    Rerunning into the same --out continues it: finished stages whose config did not change are skipped."""
    from rich.markdown import Markdown

    from userip.report import headline
    from userip.run import run

    record = run(config, out, quick=quick, seed=seed, overwrite=overwrite)
    run_dir = Path(out) if out is not None else Path("runs") / record["name"]
    console.rule("summary")
    console.print(Markdown("\n".join(f"- {line}" for line in headline(run_dir))))
    for name, st in record["stages"].items():
        console.print(f"  {name:<10} {st['wall_s']:>8.1f} s  {st['peak_rss_mb']:>7.0f} MB")
    console.print(f"report: {run_dir / 'report.md'} and {run_dir / 'report.html'}")


# ---------------------------------------------------------------- end run


# ---------------------------------------------------------------- export
@export_app.command("fuxictr")
@_friendly
def export_fuxictr_cmd(
    run: Path = typer.Option(..., "--run", help="A `userip run` directory (reads RUN/data and RUN/bank.sqlite)."),
    out: Path = typer.Option(..., "--out", help="Output dir: train/valid/test.csv, dataset_config.yaml, "
                             "model_config.yaml, export.json."),
    bank: str | None = typer.Option(None, "--bank", help="Feature bank (path or URL; default RUN/bank.sqlite)."),
    history_len: int | None = typer.Option(
        None, "--history-len", help="Length of the history field (default: the run's CTR stage's)."
    ),
    models: str = typer.Option("DeepFM,DCN", "--models", help="FuxiCTR models to configure (comma list)."),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Write the run's CTR split with one column per profile ID as FuxiCTR CSVs and configs (each model with
    and without the profile fields)."""
    from userip.export import export_fuxictr

    info = export_fuxictr(run, out, bank=bank, history_len=history_len, overwrite=overwrite,
                          models=[m.strip() for m in models.split(",") if m.strip()])
    rows = ", ".join(f"{f} {n}" for f, n in info["rows"].items())
    console.print(f"wrote {out}: {rows}; profile columns {', '.join(p['column'] for p in info['profiles'])}")
    console.print(f"experiments: {', '.join(info['experiment_ids'])} (FuxiCTR: --config {out} --expid ID)")
# ---------------------------------------------------------------- end export


# ---------------------------------------------------------------- serve
@app.command("serve")
@_friendly
def serve_cmd(
    bank: str = typer.Option(..., "--bank", help="Feature bank (path or URL) the model reads profile IDs from."),
    ctr: Path = typer.Option(..., "--ctr", help="CTR dir (`userip ctr train --out`): results.json, models/."),
    data: Path | None = typer.Option(None, "--data", help="Prepared data dir (default: the one in results.json)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    backbone: str | None = typer.Option(
        None, "--backbone", help="Model under CTR/models (default: the first trained with +ids)."
    ),
    explanations: Path | None = typer.Option(
        None, "--explanations", help="explanations.json (default: looked up next to the bank / run dir)."
    ),
    max_batch: int = typer.Option(1000, "--max-batch", min=1, help="Most item ids per score request."),
    history: str = typer.Option("all", "--history", help="User history for DIN/history fields: all or train."),
    access_log: bool = typer.Option(False, "--access-log/--no-access-log", help="Log every request."),
) -> None:
    """Serve CTR scores over HTTP from the trained model and the bank (no LLM call)."""
    from userip.serve import serve

    serve(bank, ctr, data, backbone, host=host, port=port, max_batch=max_batch, explanations=explanations,
          history=history, access_log=access_log)
# ---------------------------------------------------------------- end serve


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
