"""`userip explain`: explain each profile code."""

from __future__ import annotations

from pathlib import Path

import typer

from userip.cli.common import _friendly, app, console


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
