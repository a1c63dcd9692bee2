"""Pick the BLAS that MLX's CPU backend calls, and describe the backend for logs.

mlx-cpu wheels for Linux link a bundled *reference* BLAS (``mlx_cpu.libs/libblas-*.so``):
correct but many times slower than OpenBLAS on the matvecs and GEMMs of a transformer.
``libmlx.so`` leaves ``cblas_sgemm`` undefined and the dynamic linker resolves it through the
global scope first and the library's own dependencies second. So an OpenBLAS loaded with
``RTLD_GLOBAL`` *before* ``libmlx.so`` is loaded wins, in-process, with no ``LD_PRELOAD``.
Loaded *after* it has no effect (libmlx stays on the reference BLAS), hence the rule:

    Call :func:`configure_blas` before ``mlx.core`` is imported for the first time in the
    process (entry points: first thing, before importing anything that imports mlx). Once mlx is imported the choice
    is fixed: a later call changes nothing and says so ("unchanged").

Where importing order cannot be controlled, :func:`reexec_with_blas_if_needed` re-executes the
process with ``LD_PRELOAD`` set, which has the same effect.

Sources, in order: a BLAS already in the global scope (``LD_PRELOAD``: nothing can undo it);
``MLXSERVE_BLAS`` (a path, ``off`` or ``auto``, the default); Debian/Ubuntu's
``libopenblas0-pthread`` (or -openmp/-serial); other distributions' ``libopenblas.so.0``. PyPI's OpenBLAS builds (numpy's ``scipy_openblas64_``,
``scipy-openblas32``) prefix their symbols (``scipy_cblas_sgemm``) and cannot stand in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import struct
import sys
import sysconfig
import threading
from pathlib import Path

import attrs

from ...config import ENV_BLAS, ENV_BLAS_REEXEC, CpuSettings
from . import jitflags, smallgemm
from .machine import cpu_count

log = logging.getLogger(__name__)

_SYMBOL = "cblas_sgemm"


@attrs.frozen
class BlasInfo:
    name: str  # "openblas" | "reference" | "other" (another BLAS) | "accelerate" (macOS)
    path: str | None
    reason: str
    threads: int | None = None
    # The few-row decode kernels in front of the BLAS (smallgemm.py): their library, or None
    # and why not.
    small_gemm: str | None = None
    small_gemm_reason: str | None = None
    # How MLX's run-time compiled CPU kernels are built (jitflags.py): "on (...)" or why not.
    cpu_jit: str | None = None

    @property
    def optimized(self) -> bool:
        return self.name != "reference"


_info: BlasInfo | None = None
_lock = threading.Lock()
_handle: tuple | None = None  # keeps the libraries loaded for the process's life


def _multiarch() -> str:
    arch = sysconfig.get_config_var("MULTIARCH")
    if arch:
        return arch
    return f"{platform.machine()}-linux-gnu"


def candidate_paths() -> list[str]:
    """System OpenBLAS builds that export unprefixed CBLAS, most preferred first."""
    arch = _multiarch()
    paths = [
        # Debian/Ubuntu: libopenblas0-pthread, then the OpenMP and serial variants.
        f"/usr/lib/{arch}/openblas-pthread/libopenblas.so.0",
        f"/usr/lib/{arch}/openblas-openmp/libopenblas.so.0",
        f"/usr/lib/{arch}/openblas-serial/libopenblas.so.0",
        # The update-alternatives link (whichever variant is installed).
        f"/usr/lib/{arch}/libopenblas.so.0",
        # Fedora/RHEL (openblas-pthreads / openblas), Arch, Alpine.
        "/usr/lib64/libopenblasp.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ]
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    seen: set[str] = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


def default_blas_threads() -> int:
    """All cores but one. BLAS threads spin between calls, and the engine needs a core of its own
    for everything that is not a GEMM (MLX's stream thread runs the other ops, Python builds the
    next step's graph, the HTTP side streams tokens); benchmarks/results/history-cpu.md."""
    return max(1, cpu_count() - 1)


def _threads() -> int | None:
    value = os.environ.get("OPENBLAS_NUM_THREADS")
    try:
        return int(value) if value else None
    except ValueError:
        return None


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _library_of(address: int) -> str | None:
    """The file of the shared object that contains ``address`` (dladdr)."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int
    info = _DlInfo()
    if not dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _global_provider() -> str | None:
    """Which library the global scope resolves ``cblas_sgemm`` to (None: not defined there)."""
    try:
        fn = getattr(ctypes.CDLL(None), _SYMBOL)
    except (OSError, AttributeError):
        return None
    return _library_of(ctypes.cast(fn, ctypes.c_void_p).value)


def _is_openblas(path: str | None) -> bool:
    return bool(path) and "openblas" in path.lower()


def _open(path: str) -> tuple[ctypes.CDLL | None, str]:
    """Load ``path`` into the process without exposing its symbols yet (RTLD_LOCAL)."""
    if not os.path.exists(path):
        return None, "not found"
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return None, f"cannot load: {exc}"
    if not hasattr(lib, _SYMBOL):
        # Prefixed builds (scipy_cblas_sgemm) load fine but cannot serve libmlx.
        return None, f"does not export {_SYMBOL}"
    return lib, "ok"


def _make_global(path: str, expected: str) -> tuple[ctypes.CDLL | None, str]:
    """Promote ``path`` to the global scope; ``cblas_sgemm`` must then resolve to ``expected``
    (the same library, or the small-GEMM kernels loaded just before it)."""
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    provider = _global_provider()
    if provider and provider != os.path.realpath(expected):
        return None, f"global scope resolves {_SYMBOL} to {provider} instead"
    return lib, "ok"


def _load_small_gemm(fallback: ctypes.CDLL) -> tuple[ctypes.CDLL | None, str]:
    """Build (or find) the few-row kernels and put them in the global scope ahead of the BLAS,
    which serves every call they do not take. (None, why) where they cannot be used."""
    path, why = smallgemm.build()
    if path is None:
        return None, why
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return None, f"cannot load: {exc}"
    lib.mlxserve_sgemm_set_fallback.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 3
    lib.mlxserve_sgemm_set_fallback(
        ctypes.cast(getattr(fallback, _SYMBOL), ctypes.c_void_p),
        smallgemm.MAX_ROWS,
        smallgemm.threads(),
        smallgemm.SPIN_US,
    )
    return lib, why


def configure_blas() -> BlasInfo:
    """Make MLX's CPU backend use OpenBLAS when one is installed; say what was chosen.

    Must run before the first ``import mlx.core`` in the process; idempotent and thread-safe.
    Honours ``MLXSERVE_BLAS`` (a library path, ``off`` or ``auto``) and
    ``OPENBLAS_NUM_THREADS`` (all usable cores but one when unset, since OpenBLAS reads it
    once, when it loads). Never raises: the reference BLAS is the fallback.
    """
    global _info
    with _lock:
        if _info is None:
            _info = _configure()
            if sys.platform != "darwin":
                _info = attrs.evolve(_info, cpu_jit=jitflags.install())
            log.debug("BLAS: %s", _info)
        return _info


def _off(setting: str) -> bool:
    return setting.lower() in ("off", "0", "none", "reference", "false")


def _configure() -> BlasInfo:
    global _handle
    if sys.platform == "darwin":
        return BlasInfo("accelerate", None, "macOS: MLX links Accelerate")
    setting = CpuSettings.from_env().blas
    if "mlx.core" in sys.modules:
        bound = mlx_blas_library()
        return BlasInfo(_classify(bound), bound, "unchanged: mlx.core was imported before configure_blas()", _threads())

    # An LD_PRELOADed BLAS is in effect whatever MLXSERVE_BLAS says.
    provider = _global_provider()
    if provider:
        reason = "already in the global scope (LD_PRELOAD)"
        if _off(setting):
            reason += f"; {ENV_BLAS}={setting} cannot undo that"
        return BlasInfo(_classify(provider), provider, reason, _threads())
    if _off(setting):
        return BlasInfo("reference", None, f"{ENV_BLAS}={setting}")

    explicit = setting.lower() not in ("", "auto")
    paths = [setting] if explicit else candidate_paths()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(default_blas_threads()))
    misses = []
    for path in paths:
        lib, why = _open(path)
        if lib is None:
            misses.append(why)
            continue
        real = os.path.realpath(path)
        # The kernels must enter the global scope before the BLAS: the first definition wins.
        kernels, kernels_why = _load_small_gemm(lib)
        expected = _library_of(ctypes.cast(kernels.cblas_sgemm, ctypes.c_void_p).value) if kernels else real
        lib, why = _make_global(path, expected or real)
        if lib is None:
            misses.append(why)
            continue
        _handle = (lib, kernels)
        source = ENV_BLAS if explicit else "found"
        small = expected if kernels else None
        return BlasInfo(
            _classify(real),
            real,
            f"{source}, loaded RTLD_GLOBAL",
            _threads(),
            small_gemm=small,
            small_gemm_reason=kernels_why,
        )
    if explicit:
        reason = f"{ENV_BLAS}={setting} unusable ({misses[0]})"
        log.warning("BLAS: %s; using the reference BLAS", reason)
    else:
        reason = "no OpenBLAS found (install libopenblas0-pthread)"
    return BlasInfo("reference", None, reason)


def _classify(path: str | None) -> str:
    if path is None or "mlx_cpu.libs" in path or os.path.basename(path).startswith("libblas-"):
        return "reference"
    return "openblas" if _is_openblas(path) else "other"


# --- what libmlx actually calls -------------------------------------------------------------


def _elf_slot_offset(path: str, symbol: str) -> int | None:
    """Offset (from the load base) of the PLT/GOT slot through which ``path`` calls ``symbol``.

    A small ELF64 little-endian reader: the section table, then each SHT_RELA section whose
    linked symbol table names ``symbol``.
    """
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        (shoff,) = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]

        def read(sec):
            f.seek(sec[4])
            return f.read(sec[5])

        want = symbol.encode()
        for sec in sections:
            if sec[1] != 4 or sec[6] == 0:  # SHT_RELA with a symbol table
                continue
            symtab = sections[sec[6]]
            strtab = read(sections[symtab[6]])
            syms = read(symtab)
            relas = read(sec)
            for off in range(0, len(relas), 24):
                r_offset, r_info = struct.unpack_from("<QQ", relas, off)
                (st_name,) = struct.unpack_from("<I", syms, (r_info >> 32) * 24)
                end = strtab.find(b"\0", st_name)
                if strtab[st_name:end] == want:
                    return r_offset
    return None


def _mapped_base(path: str) -> int | None:
    real = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) >= 6 and parts[2] == "00000000" and os.path.realpath(parts[5]) == real:
                    return int(parts[0].split("-")[0], 16)
    except OSError:
        pass
    return None


def _libmlx_path() -> str | None:
    import mlx

    for root in mlx.__path__:
        candidate = Path(root) / "lib" / "libmlx.so"
        if candidate.exists():
            return str(candidate)
    return None


def mlx_blas_library() -> str | None:
    """The library whose ``cblas_sgemm`` libmlx calls, read from libmlx's own GOT slot.

    Imports mlx and runs one tiny f32 matmul on the CPU so a lazily bound slot is filled. None
    where this cannot be told (not Linux/ELF, no mlx, a static build).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import mlx.core as mx

        lib = _libmlx_path()
        if lib is None:
            return None
        offset = _elf_slot_offset(lib, _SYMBOL)
        base = _mapped_base(lib)
        if offset is None or base is None:
            return None
        a = mx.ones((2, 2), dtype=mx.float32)
        mx.eval(mx.matmul(a, a, stream=mx.cpu))
        target = ctypes.c_void_p.from_address(base + offset).value
    except Exception:  # a diagnostic: never let it break serving
        log.debug("cannot read libmlx's cblas_sgemm slot", exc_info=True)
        return None
    return _library_of(target) if target else None


def describe_backend() -> dict:
    """Device and BLAS facts for the startup log (imports mlx)."""
    import mlx.core as mx

    try:
        gpu = mx.is_available(mx.gpu)
    except Exception:
        gpu = False
    info = _info or configure_blas()
    bound = mlx_blas_library()
    kernels = bound is not None and bound == info.small_gemm
    name = info.name if kernels else _classify(bound) if bound is not None else info.name
    return {
        "device": "gpu" if gpu else "cpu",
        "blas": name,
        "blas_path": info.path if kernels else bound or info.path,
        "blas_reason": info.reason,
        "blas_threads": _threads() if name != "reference" else None,
        # libmlx's cblas_sgemm lands in the few-row kernels (which pass the rest to the BLAS).
        "small_gemm": kernels,
        "small_gemm_reason": info.small_gemm_reason,
        "cpu_jit": info.cpu_jit,
        "mlx_version": getattr(mx, "__version__", "?"),
    }


def small_gemm_active() -> bool:
    """Whether decode-sized products go through smallgemm's kernels in this process."""
    return _info is not None and _info.small_gemm is not None


# --- launcher route ---------------------------------------------------------------------------


def reexec_with_blas_if_needed(argv: list[str] | None = None) -> None:
    """Re-execute this process with ``LD_PRELOAD`` naming OpenBLAS, if that would help.

    ``argv`` is what follows the interpreter on the new command line; the default,
    ``sys.orig_argv[1:]``, also repeats ``-m module`` (``sys.argv`` suits console scripts).

    For entry points that cannot guarantee :func:`configure_blas` runs before mlx is imported.
    Returns (does nothing) when OpenBLAS is already in use or could still be loaded in-process,
    when ``MLXSERVE_BLAS=off``, when none is installed, or in the re-executed child. Otherwise
    does not return.
    """
    cpu = CpuSettings.from_env()
    if not sys.platform.startswith("linux") or cpu.reexec_child:
        return
    setting = cpu.blas
    if _off(setting):
        return
    if "mlx.core" not in sys.modules:
        return  # configure_blas() can still do it in-process
    if _classify(mlx_blas_library()) != "reference":
        return
    explicit = setting.lower() not in ("", "auto")
    paths = [setting] if explicit else candidate_paths()
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [path, env.get("LD_PRELOAD", "")]))
    env[ENV_BLAS_REEXEC] = "1"
    env.setdefault("OPENBLAS_NUM_THREADS", str(default_blas_threads()))
    args = list(sys.orig_argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)
