"""``mlxctl pull``, ``push`` (through the daemon, with progress bars) and ``pack``, ``unpack``
(directly on the local store, like ``create --local``: for machines with no registry)."""

from __future__ import annotations

import sys
from pathlib import Path

import asyncclick as click


def _bars():
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


class _Shown:
    """Progress events drawn as one bar per layer; other statuses printed as lines."""

    def __init__(self, bars):
        self.bars = bars
        self.tasks: dict[str, int] = {}

    def __call__(self, event: dict) -> None:
        digest = event.get("digest")
        if digest and event.get("total") is not None:
            task = self.tasks.get(digest)
            if task is None:
                task = self.tasks[digest] = self.bars.add_task(event.get("status", digest[7:19]), total=event["total"])
            self.bars.update(task, completed=event.get("completed", 0))
        elif event.get("status"):
            self.bars.console.print(event["status"])


async def _stream(path: str, body: dict, what: str) -> None:
    from .client import events

    cancelled = False
    with _bars() as bars:
        show = _Shown(bars)
        try:
            async for event in events(path, body, before_fail=bars.stop):
                show(event)
        except KeyboardInterrupt:
            cancelled = True  # leaving closes the connection: the daemon stops the transfer
    if cancelled:
        note = "; run it again to resume" if what == "pull" else ""
        click.echo(f"{what} cancelled{note}", err=True)
        sys.exit(130)


@click.command()
@click.argument("name")
@click.option("--insecure", is_flag=True, help="allow a plain-HTTP registry (localhost registries always may)")
async def pull(name: str, insecure: bool) -> None:
    """Pull a model from a registry (resumes an interrupted pull)."""
    await _stream("/api/pull", {"model": name, "insecure": insecure, "stream": True}, "pull")


@click.command()
@click.argument("name")
@click.option("--insecure", is_flag=True, help="allow a plain-HTTP registry (localhost registries always may)")
async def push(name: str, insecure: bool) -> None:
    """Push a model to the registry its name points at (registry/namespace/name:tag)."""
    await _stream("/api/push", {"model": name, "insecure": insecure, "stream": True}, "push")


def _local_store():
    from ..store.store import Store
    from .client import settings as _settings

    return Store.for_settings(_settings())


@click.command()
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the .tar file to write")
async def pack(name: str, output: str) -> None:
    """Write a model as an OCI image layout archive (for machines with no registry)."""
    from ..errors import MlxserveError
    from ..store import transfer
    from .client import fail as _fail

    try:
        with _bars() as bars:
            info = transfer.pack(_local_store(), name, Path(output), progress=_Shown(bars))
    except MlxserveError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {output}: {exc}")
    click.echo(f"packed {info['name']} ({info['digest'][:19]}) into {output}")


@click.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.argument("name", required=False)
async def unpack(archive: str, name: str | None) -> None:
    """Import a model from an archive written by `mlxctl pack` (every blob is verified)."""
    from ..errors import MlxserveError
    from ..store import transfer
    from .client import fail as _fail

    try:
        with _bars() as bars:
            model = transfer.unpack(_local_store(), Path(archive), name, progress=_Shown(bars))
    except MlxserveError as exc:
        _fail(str(exc))
    click.echo(f"imported {model}")


COMMANDS = [pull, push, pack, unpack]
