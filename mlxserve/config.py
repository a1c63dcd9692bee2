"""Settings, read once from MLXSERVE_* environment variables."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import BadRequest

FOREVER_AFTER = 100 * 365 * 86400.0


def parse_duration(value: str | int | float | None, *, default: float | None = None) -> float | None:
    """Ollama keep_alive: seconds as a number, a Go duration string ("5m", "1h30m", "-1"), or None.

    Returns seconds; a negative value means "forever" and is returned as ``float('inf')``.
    """
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise BadRequest("keep_alive must be a number of seconds or a duration string")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds = _go_duration(text)
    if math.isnan(seconds):
        raise BadRequest("invalid duration: NaN")
    # Negative means forever (Ollama); so does anything past a century, which no clock can hold.
    return float("inf") if seconds < 0 or seconds > FOREVER_AFTER else seconds


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _go_duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    rest = text.lstrip("+-")
    total, num = 0.0, ""
    i = 0
    if not rest:
        raise BadRequest(f"invalid duration '{text}'")
    while i < len(rest):
        c = rest[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = rest[i : i + 2] if rest[i : i + 2] in _UNITS else c
        if unit not in _UNITS or not num:
            raise BadRequest(f"invalid duration '{text}'")
        total += float(num) * _UNITS[unit]
        num = ""
        i += len(unit)
    if num:
        raise BadRequest(f"invalid duration '{text}': missing unit")
    return sign * total


def _host_port(value: str) -> tuple[str, int]:
    value = value.strip()
    if "://" in value:
        value = value.split("://", 1)[1]
    host, sep, port = value.rpartition(":")
    if not sep:
        return value or "127.0.0.1", 11434
    return (host.strip("[]") or "127.0.0.1"), int(port)


def parse_api_keys(value: str) -> tuple[str, ...]:
    """MLXSERVE_API_KEYS: keys separated by commas, or ``@FILE``: one key per line of FILE
    (blank lines and lines starting with ``#`` skipped), so keys need not sit in the environment."""
    value = value.strip()
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"MLXSERVE_API_KEYS: cannot read {path}: {exc}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        keys = [k.strip() for k in value.split(",") if k.strip()]
    if not keys:
        raise ValueError("MLXSERVE_API_KEYS names no key")
    return tuple(_api_key(k, "MLXSERVE_API_KEYS") for k in keys)


def _api_key(key: str, name: str) -> str:
    # A key travels in an HTTP header: visible ASCII only, so that it compares byte for byte.
    if not all("!" <= c <= "~" for c in key):
        raise ValueError(f"{name}: a key may hold only visible ASCII characters (no spaces)")
    return key


# Sequences decoded together per model: a step's cost barely grows from 8 to 16 rows, so 16 serves
# twice the clients at nearly the same per-stream speed (docs/performance.md). KV memory is lazy.
DEFAULT_NUM_PARALLEL = 16


@attrs.frozen
class AdmitWindow:
    """How long an idle engine collects arriving requests before it prefills them as one batch.

    A request that wakes the engine waits ``first_gap_s`` (3 ms, or ``gap_s`` if less) for a
    second one, so a lone request starts at once. Once a second has come it is a burst: the
    engine keeps collecting while each next request comes within ``gap_s``, for ``max_s`` in
    all, or until every slot is taken. Clients of one burst reach the engine several ms apart on a
    busy machine; a shorter window splits the burst into several prefills, and its last requests
    wait a whole prefill longer for their first token.
    """

    gap_s: float = 0.010
    max_s: float = 0.150

    @property
    def first_gap_s(self) -> float:
        return min(0.003, self.gap_s)

    @classmethod
    def parse(cls, text: str) -> AdmitWindow:
        """``"GAP_MS,MAX_MS"`` (MLXSERVE_ADMIT_WINDOW); ``"0,0"`` admits whatever is queued."""
        try:
            gap, cap = (float(x) / 1e3 for x in text.split(","))
        except ValueError:
            raise ValueError(f"MLXSERVE_ADMIT_WINDOW must be GAP_MS,MAX_MS (e.g. 10,150), not {text!r}") from None
        if not (0 <= gap <= cap <= 10):
            raise ValueError(f"MLXSERVE_ADMIT_WINDOW needs 0 <= GAP_MS <= MAX_MS <= 10000, not {text!r}")
        return cls(gap_s=gap, max_s=cap)


@attrs.frozen
class TransferOptions:
    """How pulls and pushes talk to a registry (MLXSERVE_REGISTRY_*)."""

    retries: int = 5  # attempts after the first
    backoff: float = 0.5  # first backoff in seconds; doubles, with jitter, up to backoff_max
    backoff_max: float = 15.0
    stall_timeout: float = 30.0  # no byte for this long: the connection is dropped and retried
    connect_timeout: float = 10.0
    parallel: int = 3  # blob transfers at once
    chunk_size: int = 64 << 20  # uploads larger than this go as PATCH chunks of this size
    auth: str | None = attrs.field(default=None, repr=False)  # "user:password" for token endpoints

    @classmethod
    def parse(cls, env: dict[str, str]) -> TransferOptions:
        """Defaults, overridden by MLXSERVE_REGISTRY_{RETRIES,BACKOFF,STALL_S,PARALLEL,CHUNK,AUTH}."""
        d = cls()
        try:
            return cls(
                retries=int(env.get("MLXSERVE_REGISTRY_RETRIES", d.retries)),
                backoff=float(env.get("MLXSERVE_REGISTRY_BACKOFF", d.backoff)),
                stall_timeout=float(env.get("MLXSERVE_REGISTRY_STALL_S", d.stall_timeout)),
                parallel=max(1, int(env.get("MLXSERVE_REGISTRY_PARALLEL", d.parallel))),
                chunk_size=max(1 << 20, int(env.get("MLXSERVE_REGISTRY_CHUNK", d.chunk_size))),
                auth=env.get("MLXSERVE_REGISTRY_AUTH") or None,
            )
        except ValueError as exc:
            raise ValueError(f"MLXSERVE_REGISTRY_*: {exc}") from None


def is_off(value: str | None) -> bool:
    """How an on-by-default MLXSERVE_* switch is turned off."""
    return (value or "").strip().lower() in ("off", "0", "false", "none")


# The CPU bootstrap's variables, named once for its messages and the tests that set them.
ENV_BLAS = "MLXSERVE_BLAS"
ENV_SMALL_GEMM = "MLXSERVE_SMALL_GEMM"
ENV_GEMM_THREADS = "MLXSERVE_GEMM_THREADS"
ENV_JIT_NATIVE = "MLXSERVE_JIT_NATIVE"
ENV_QKERNELS = "MLXSERVE_QKERNELS"
ENV_SUBMIT_LAYERS = "MLXSERVE_SUBMIT_LAYERS"
SUBMIT_LAYERS = 2  # a CPU step is handed to MLX every this many layers (engine/submit.py)
# Not a setting: the BLAS re-exec marks its child, so a child that still cannot load OpenBLAS
# does not re-exec again.
ENV_BLAS_REEXEC = "MLXSERVE_BLAS_REEXEC"


def _cache_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlxserve"


@attrs.frozen
class CpuSettings:
    """MLX's CPU backend on this machine (engine/cpu/). Read before ``mlx.core`` is first imported,
    so it is cheap and never raises: a value it cannot use means the default."""

    blas: str = "auto"  # MLXSERVE_BLAS: a library path, "off" or "auto"
    small_gemm: bool = True  # MLXSERVE_SMALL_GEMM: the few-row kernels in front of OpenBLAS
    # Where the kernels and the JIT wrapper are built: a directory MLXSERVE_SMALL_GEMM names, else
    # $XDG_CACHE_HOME/mlxserve.
    cache_dir: Path = attrs.field(factory=lambda: _cache_dir(os.environ))
    gemm_threads: int | None = None  # MLXSERVE_GEMM_THREADS; None: each kernel set's default
    jit_native: bool = True  # MLXSERVE_JIT_NATIVE: MLX's run-time CPU kernels built -march=native
    qkernels: bool = True  # MLXSERVE_QKERNELS: the quantized CPU kernels
    submit_layers: int = SUBMIT_LAYERS  # MLXSERVE_SUBMIT_LAYERS; 0: a step goes to MLX whole
    reexec_child: bool = False  # this process is the BLAS re-exec's child (ENV_BLAS_REEXEC)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CpuSettings:
        env = os.environ if env is None else env
        small = env.get(ENV_SMALL_GEMM, "")
        threads = env.get(ENV_GEMM_THREADS, "").strip()
        submit = env.get(ENV_SUBMIT_LAYERS, "").strip()
        named_dir = small and small.lower() not in ("on", "auto") and not is_off(small)
        return cls(
            blas=env.get(ENV_BLAS, "auto").strip(),
            small_gemm=not is_off(small),
            cache_dir=Path(small) if named_dir else _cache_dir(env),
            gemm_threads=int(threads) if threads.isdigit() and int(threads) > 0 else None,
            jit_native=not is_off(env.get(ENV_JIT_NATIVE)),
            qkernels=not is_off(env.get(ENV_QKERNELS)),
            submit_layers=int(submit) if submit.isdigit() else SUBMIT_LAYERS,
            reexec_child=bool(env.get(ENV_BLAS_REEXEC)),
        )


@attrs.frozen
class DistSettings:
    """One model across the ranks of an ``mlx.launch`` group (engine/distributed.py)."""

    backend: str | None = None  # MLXSERVE_DIST_BACKEND; None: from mlx.launch's environment
    control: str | None = None  # MLXSERVE_DIST_CONTROL: where rank 0's step control listens
    split: str = "auto"  # MLXSERVE_DIST_SPLIT: "tensor", "pipeline" or "auto"
    timeout: float = 30.0  # MLXSERVE_DIST_TIMEOUT: seconds of silence before a rank is dead

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistSettings:
        env = os.environ if env is None else env
        d = cls()
        timeout = env.get("MLXSERVE_DIST_TIMEOUT") or str(d.timeout)
        try:
            seconds = float(timeout)
        except ValueError:
            raise ValueError(f"MLXSERVE_DIST_TIMEOUT must be a number of seconds, not {timeout!r}") from None
        return cls(
            backend=env.get("MLXSERVE_DIST_BACKEND") or None,
            control=env.get("MLXSERVE_DIST_CONTROL") or None,
            split=env.get("MLXSERVE_DIST_SPLIT") or d.split,
            timeout=seconds,
        )


@attrs.frozen
class Settings:
    host: str = "127.0.0.1"
    port: int = 11434
    models_dir: Path = attrs.field(factory=lambda: Path.home() / ".mlxserve" / "models")
    keep_alive: float = 300.0
    max_loaded_models: int = 3
    max_memory: int | None = None  # bytes; None: three quarters of physical memory
    num_parallel: int = DEFAULT_NUM_PARALLEL
    max_queue: int = 512
    default_registry: str = "registry.ollama.ai"
    max_body_bytes: int = 64 * 1024 * 1024
    prompt_cache_bytes: int = 512 * 1024 * 1024
    prefill_chunk: int = 256
    # SIGTERM's drain (MLXSERVE_DRAIN_SECONDS): how long requests in flight may take to finish
    # while /api/ready answers 503 and new work is refused; then what is left gets an error.
    drain_seconds: float = 10.0
    log_dir: Path | None = None
    debug: bool = False
    weight_dtype: str | None = None  # "keep", "float32", "float16"; None = choose per backend
    device: str | None = None  # "cpu" or "gpu"; None = GPU when present
    admit_window: AdmitWindow = AdmitWindow()
    # Browser origins allowed besides the local ones (MLXSERVE_ORIGINS, as OLLAMA_ORIGINS):
    # patterns where ``*`` matches anything; ``"*"`` alone allows every origin.
    origins: tuple[str, ...] = ()
    # Keys a client must present (MLXSERVE_API_KEYS); empty: no key is asked for.
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    # The key mlxctl sends (MLXSERVE_API_KEY, else the first of MLXSERVE_API_KEYS).
    api_key: str | None = attrs.field(default=None, repr=False)
    # The chaos harness's faults (actors/faults.py), all off by default: its control file
    # (MLXSERVE_FAULT_CONTROL) and the create stage that kills the daemon
    # (MLXSERVE_FAULT_CREATE_KILL_AFTER: "blob" or "before_manifest").
    fault_control: Path | None = None
    fault_create_kill_after: str | None = None
    transfer: TransferOptions = TransferOptions()  # pulls and pushes (MLXSERVE_REGISTRY_*)
    # The CPU bootstrap reads these itself (CpuSettings.from_env), before mlx.core is imported.
    cpu: CpuSettings = attrs.field(factory=CpuSettings)
    dist: DistSettings = DistSettings()  # several ranks (MLXSERVE_DIST_*)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        kw: dict[str, Any] = {}
        if v := env.get("MLXSERVE_HOST"):
            kw["host"], kw["port"] = _host_port(v)
        if v := env.get("MLXSERVE_MODELS"):
            kw["models_dir"] = Path(v).expanduser()
        if v := env.get("MLXSERVE_KEEP_ALIVE"):
            kw["keep_alive"] = parse_duration(v)
        for name, key in (
            ("max_loaded_models", "MLXSERVE_MAX_LOADED_MODELS"),
            ("num_parallel", "MLXSERVE_NUM_PARALLEL"),
            ("max_queue", "MLXSERVE_MAX_QUEUE"),
            ("max_body_bytes", "MLXSERVE_MAX_BODY_BYTES"),
            ("prompt_cache_bytes", "MLXSERVE_PROMPT_CACHE_BYTES"),
            ("prefill_chunk", "MLXSERVE_PREFILL_CHUNK"),
            ("max_memory", "MLXSERVE_MAX_MEMORY"),
        ):
            if v := env.get(key):
                try:
                    kw[name] = int(v)
                except ValueError:
                    raise ValueError(f"{key} must be a whole number, not {v!r}") from None
        if v := env.get("MLXSERVE_DRAIN_SECONDS"):
            try:
                kw["drain_seconds"] = float(v)
            except ValueError:
                raise ValueError(f"MLXSERVE_DRAIN_SECONDS must be a number of seconds, not {v!r}") from None
            if not 0 <= kw["drain_seconds"] < FOREVER_AFTER:
                raise ValueError(f"MLXSERVE_DRAIN_SECONDS must be 0 or more seconds, not {v!r}")
        if v := env.get("MLXSERVE_REGISTRY"):
            kw["default_registry"] = v
        if v := env.get("MLXSERVE_LOG_DIR"):
            kw["log_dir"] = Path(v).expanduser()
        if env.get("MLXSERVE_DEBUG", "") not in ("", "0", "false"):
            kw["debug"] = True
        if v := env.get("MLXSERVE_WEIGHT_DTYPE"):
            kw["weight_dtype"] = v
        if v := env.get("MLXSERVE_DEVICE"):
            kw["device"] = v
        if v := env.get("MLXSERVE_ADMIT_WINDOW"):
            kw["admit_window"] = AdmitWindow.parse(v)
        if v := env.get("MLXSERVE_ORIGINS"):
            kw["origins"] = tuple(o.strip() for o in v.split(",") if o.strip())
        kw["transfer"] = TransferOptions.parse(env)
        kw["cpu"] = CpuSettings.from_env(env)
        kw["dist"] = DistSettings.from_env(env)
        if v := env.get("MLXSERVE_FAULT_CONTROL"):
            kw["fault_control"] = Path(v)
        if v := env.get("MLXSERVE_FAULT_CREATE_KILL_AFTER"):
            kw["fault_create_kill_after"] = v
        if v := env.get("MLXSERVE_API_KEYS"):
            kw["api_keys"] = parse_api_keys(v)
        if v := env.get("MLXSERVE_API_KEY", "").strip() or next(iter(kw.get("api_keys", ())), None):
            kw["api_key"] = _api_key(v, "MLXSERVE_API_KEY")
        kw.update(overrides)
        return cls(**kw)

    @property
    def memory_budget(self) -> int | None:
        if self.max_memory is not None:
            return self.max_memory
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4
        except (ValueError, OSError, AttributeError):
            return None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"
