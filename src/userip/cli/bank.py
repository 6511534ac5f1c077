"""`userip bank`: build, read, inspect and delete from the feature bank."""

from __future__ import annotations

from pathlib import Path

import typer

from userip.cli.common import _friendly, bank_app, console


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
