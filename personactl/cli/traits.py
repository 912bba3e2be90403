"""`personactl traits list|show|validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import emit_json, guarded, stdout_console

app = typer.Typer(help="List, show, validate and draft (new) trait files.", no_args_is_help=True)


@app.command("list")
@guarded
def list_traits(json: o.Json = False) -> None:
    """List the traits found in ./traits and the shipped traits."""
    from rich.markup import escape
    from rich.table import Table

    from personactl.errors import TraitError
    from personactl.store.traits import list_trait_files, load_trait

    rows = []
    for path in list_trait_files():
        try:
            t = load_trait(path)
            rows.append(
                {
                    "name": t.name,
                    "path": str(path),
                    "instructions": len(t.instructions),
                    "extraction": len(t.questions.extraction),
                    "evaluation": len(t.questions.evaluation),
                    "description": t.description,
                    "error": None,
                }
            )
        except TraitError as exc:
            rows.append({"name": path.stem, "path": str(path), "error": exc.message})
    if json:
        emit_json({"traits": rows})
        return
    table = Table(title="traits")
    table.add_column("name", no_wrap=True, min_width=8)
    for header in ("pairs", "extract q", "eval q"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("description (first sentence)", overflow="fold", ratio=1)
    for r in rows:
        if r["error"]:
            table.add_row(escape(r["name"]), "", "", "", f"[red]invalid: {escape(r['error'])}[/]")
        else:
            table.add_row(
                escape(r["name"]),
                str(r["instructions"]),
                str(r["extraction"]),
                str(r["evaluation"]),
                escape(_first_sentence(r["description"])),
            )
    stdout_console().print(table)


def _first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    head, dot, _ = flat.partition(". ")
    return head + ("." if dot else "")


@app.command("show")
@guarded
def show(name: Annotated[str, typer.Argument(help="Trait name or path.")], json: o.Json = False) -> None:
    """Show one trait: its instruction pairs, questions and rubric."""
    from personactl.store.traits import load_trait, resolve_trait_path

    trait = load_trait(name)
    if json:
        emit_json({"path": str(resolve_trait_path(name)), "sha256": trait.sha256, **trait.model_dump()})
        return
    from rich.markup import escape

    console = stdout_console()
    console.print(
        f"[bold]{trait.name}[/]  ({escape(str(resolve_trait_path(name)))})\n{escape(trait.description.strip())}\n"
    )
    for i, pair in enumerate(trait.instructions):
        console.print(f"[green]pos {i}[/] {escape(pair.pos)}\n[red]neg {i}[/] {escape(pair.neg)}")
    console.print(f"\n[bold]extraction questions[/] ({len(trait.questions.extraction)})")
    for q in trait.questions.extraction:
        console.print(f"  • {q}", markup=False)
    console.print(f"\n[bold]evaluation questions[/] ({len(trait.questions.evaluation)})")
    for q in trait.questions.evaluation:
        console.print(f"  • {q}", markup=False)
    console.print("\n[bold]rubric[/]")
    console.print(trait.rubric, markup=False)


@app.command("validate")
@guarded
def validate(paths: Annotated[list[Path], typer.Argument(help="Trait files to check.")], json: o.Json = False) -> None:
    """Check trait files against the schema; exit 2 if any is invalid."""
    from rich.markup import escape

    from personactl.errors import TraitError
    from personactl.store.traits import load_trait

    results = []
    for path in paths:
        try:
            trait = load_trait(path)
            results.append({"path": str(path), "valid": True, "name": trait.name, "error": None})
        except TraitError as exc:
            results.append({"path": str(path), "valid": False, "name": None, "error": exc.message})
    if json:
        emit_json({"results": results})
    else:
        for r in results:
            mark = "[green]ok[/]     " if r["valid"] else "[red]invalid[/]"
            stdout_console().print(f"{mark} {escape(r['path'] if r['valid'] else r['error'])}")
    if not all(r["valid"] for r in results):
        raise typer.Exit(2)


@app.command("new")
@guarded
def new(
    description: Annotated[str, typer.Argument(help='One line describing the behaviour, e.g. "overconfident".')],
    name: Annotated[
        Optional[str],
        typer.Option("--name", help="Trait name (default: the one the LLM proposes).", show_default=False),
    ] = None,
    pairs: Annotated[int, typer.Option("--pairs", min=1, help="Instruction pairs to ask for.")] = 5,
    questions: Annotated[
        int, typer.Option("--questions", min=1, help="Extraction and evaluation questions, each.")
    ] = 20,
    judge_model: Annotated[
        Optional[str], typer.Option("--judge-model", help="Model that drafts (the judge setting).", show_default=False)
    ] = None,
    judge_base_url: o.JudgeBaseUrl = None,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens",
            min=256,
            help="Longest draft the server may write, in tokens (a reply cut there is an error that says so).",
        ),
    ] = 3072,
    timeout: Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds per request attempt.")] = 300.0,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing traits/NAME.yaml.")] = False,
    json: o.Json = False,
) -> None:
    """Draft traits/NAME.yaml from a one-line description with an LLM, for you to review."""
    from personactl.cli.common import log, settings_from
    from personactl.steps.draft_trait import new_trait_step

    settings = settings_from(config, workspace=workspace, judge_model=judge_model, judge_base_url=judge_base_url)
    summary = new_trait_step(
        settings,
        description,
        name=name,
        pairs=pairs,
        questions=questions,
        timeout=timeout,
        max_tokens=max_tokens,
        force=force,
        directory=Path.cwd() / "traits",
        log=log,
    )
    if json:
        emit_json(summary)
        return
    from rich.markup import escape

    stdout_console().print(
        f"wrote {escape(summary['path'])}: {summary['instructions']} instruction pairs, {summary['extraction']} extraction "
        f"and {summary['evaluation']} evaluation questions ({summary['attempts']} attempt(s) with {escape(summary['model'])})\n"
        f"review it, then: personactl traits validate {escape(summary['path'])} && personactl generate --trait {summary['name']}",
        soft_wrap=True,
    )
