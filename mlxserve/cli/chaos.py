"""``mlxctl chaos``: run the chaos and cancellation harness against fresh daemons."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import asyncclick as click


@click.command()
@click.option("--long", "long_", is_flag=True, help="1000 random disconnects across 16 streams (minutes)")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="write the report here as JSON"
)
@click.option("--seed", default=7, show_default=True, type=int)
@click.option("--scenario", "scenarios", multiple=True, help="run only these (repeatable)")
@click.option(
    "--workdir", type=click.Path(file_okay=False, path_type=Path), help="keep stores, daemon logs and request logs here"
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="where the daemons run (exact batched-vs-solo checks hold on the CPU only)",
)
async def chaos(
    long_: bool, json_path: Path | None, seed: int, scenarios: tuple[str, ...], workdir: Path | None, device: str
) -> None:
    """Disconnect storms and injected faults against real daemons; exit 1 on any violation."""
    from ..chaos import report
    from ..chaos.harness import Config
    from ..chaos.scenarios import ALL
    from ..chaos.suite import run_chaos

    unknown = [s for s in scenarios if s not in ALL]
    if unknown:
        raise click.BadParameter(f"unknown scenario(s) {unknown}; known: {', '.join(ALL)}")
    cfg = Config.for_mode(long_, seed=seed, scenarios=tuple(scenarios), workdir=workdir, device=device)
    doc = await run_chaos(cfg, out=lambda line: click.echo(line, err=True))
    click.echo(report.table(doc))
    if json_path is not None:
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
        click.echo(f"report written to {json_path}", err=True)
    if doc["violations"]:
        sys.exit(1)


COMMANDS = [chaos]
