"""The model store: content-addressed blobs plus OCI manifests, all blocking I/O.

    <root>/blobs/sha256-<hex>                      immutable, named by digest
    <root>/manifests/<registry>/<ns>/<name>/<tag>  OCI image manifests
    <root>/partial/                                resumable downloads (never touched here)
    <root>/tmp/                                    temp files of running writes
    <root>/verified/sha256-<hex>                   verification records (integrity.py)
    <root>/links/<manifest hex>/                   symlink directories for loaders (links.py)
    <root>/uploads/sha256-<hex>                    markers: blobs uploaded but not yet used

Every write is temp + fsync + rename, and a manifest is written only after every blob it names
is complete, so a crash leaves the old state or the new one. Writers hold a shared flock on
``<root>/.lock`` and prune holds it exclusively: prune never sees a blob whose manifest is still
being written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator

import attrs

from ..config import Settings
from ..errors import BadRequest, DigestMismatch, IntegrityError, ModelNotFound
from ..specs.modelfile import Modelfile, parse_modelfile
from ..specs.modelspec import ModelSpec
from ..specs.options import Options
from ..specs.templates import check_template
from . import create as create_steps, fsutil, gc, importers, links, manifest as mt
from .convert import Converter
from .integrity import Verifier
from .names import DEFAULT_REGISTRY, ModelName, parse_name
from .ollama_compat import spec_from_ollama

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]


@attrs.frozen
class ResolvedModel:
    name: ModelName
    display: str
    digest: str  # sha256 of the manifest bytes
    manifest: dict
    spec: ModelSpec
    size: int
    modified_at: datetime
    layers: list[dict]


class Store:
    @classmethod
    def for_settings(cls, settings: Settings, converter: Converter | None = None) -> Store:
        """The store the settings name (MLXSERVE_MODELS), as the daemon and the CLI open it."""
        return cls(
            settings.models_dir,
            default_registry=settings.default_registry,
            kill_at_stage=settings.fault_create_kill_after,
            converter=converter,
        )

    def __init__(
        self,
        root: Path,
        default_registry: str = DEFAULT_REGISTRY,
        *,
        kill_at_stage: str | None = None,
        converter: Converter | None = None,
    ):
        """``kill_at_stage``: a fault of the chaos harness's (actors/faults.py), inert when None:
        the process kills itself when a create reaches that stage ("blob", "before_manifest").
        ``converter``: the engine's conversions and model-type check (engine/convert.py), which
        a create that converts, quantizes or imports a directory needs; None opens the store
        for everything else."""
        self.kill_at_stage = kill_at_stage
        self.converter = converter
        self.root = Path(root).expanduser()
        self.default_registry = default_registry.lower()
        self.blobs_dir = self.root / "blobs"
        self.manifests_dir = self.root / "manifests"
        self.partial_dir = self.root / "partial"
        self.tmp_dir = self.root / "tmp"
        self.records_dir = self.root / "verified"
        self.links_dir = self.root / "links"
        self.uploads_dir = self.root / "uploads"
        for d in (
            self.blobs_dir,
            self.manifests_dir,
            self.partial_dir,
            self.tmp_dir,
            self.records_dir,
            self.links_dir,
            self.uploads_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.root / ".lock"
        self._verifier = Verifier(self.blobs_dir, self.records_dir)

    def _fault(self, stage: str) -> None:
        if self.kill_at_stage == stage:
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------ names and paths

    def parse(self, name: str) -> ModelName:
        return parse_name(name, self.default_registry)

    def manifest_path(self, name: ModelName) -> Path:
        return self.manifests_dir.joinpath(*name.path_parts())

    def blob_path(self, digest: str) -> Path:
        if not isinstance(digest, str) or not fsutil.DIGEST_RE.fullmatch(digest):
            raise BadRequest(f"invalid digest {digest!r} (expected sha256:<64 hex digits>)")
        return self.blobs_dir / digest.replace(":", "-")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Held while writing blobs that a manifest will name later (pulls do the same)."""
        with fsutil.file_lock(self._lock_path, exclusive=False):
            yield

    # ------------------------------------------------------------------ reading

    def resolve(self, name: str) -> ResolvedModel:
        mn = self.parse(name)
        try:
            with open(self.manifest_path(mn), "rb") as f:
                data, st = f.read(), os.fstat(f.fileno())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ModelNotFound(name) from None
        return self._resolved(mn, data, st)

    def _resolved(self, mn: ModelName, data: bytes, st: os.stat_result) -> ResolvedModel:
        display = mn.display(self.default_registry)
        doc = mt.parse_manifest(data, display)
        return ResolvedModel(
            name=mn,
            display=display,
            digest=fsutil.sha256_bytes(data),
            manifest=doc,
            spec=self._spec_of(doc, display),
            size=sum(d["size"] for d in doc["layers"]),
            modified_at=datetime.fromtimestamp(st.st_mtime, tz=UTC),
            layers=list(doc["layers"]),
        )

    def _small_blob(self, desc: dict) -> bytes:
        """A config/text blob, checked against its digest on every read (they are tiny)."""
        try:
            data = self.blob_path(desc["digest"]).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"blob {desc['digest']} is missing") from None
        if fsutil.sha256_bytes(data) != desc["digest"]:
            raise IntegrityError(
                f"blob {desc['digest']} content does not match its digest (got {fsutil.sha256_bytes(data)})"
            )
        return data

    def _spec_of(self, doc: dict, display: str) -> ModelSpec:
        config = doc["config"]
        if config["mediaType"] == mt.SPEC_MEDIA_TYPE:
            try:
                return ModelSpec.from_json(self._small_blob(config))
            except BadRequest as exc:
                raise IntegrityError(f"model '{display}': {exc}") from None
        try:
            ollama_config = json.loads(self._small_blob(config))
        except ValueError:
            ollama_config = {}
        return spec_from_ollama(
            ollama_config if isinstance(ollama_config, dict) else {}, doc["layers"], self._small_blob
        )

    def iter_manifests(self) -> Iterator[tuple[ModelName, Path]]:
        for path in sorted(self.manifests_dir.glob("*/*/*/*")):
            if not path.is_file():
                continue
            reg, ns, name, tag = path.relative_to(self.manifests_dir).parts
            try:
                mn = parse_name(f"{reg}/{ns}/{name}:{tag}", self.default_registry)
            except BadRequest:
                continue
            if mn.path_parts() == (reg, ns, name, tag):
                yield mn, path

    def list(self) -> list[ResolvedModel]:
        out = []
        for mn, path in self.iter_manifests():
            try:
                with open(path, "rb") as f:
                    out.append(self._resolved(mn, f.read(), os.fstat(f.fileno())))
            except (OSError, IntegrityError) as exc:
                log.warning("skipping model %s: %s", mn.display(self.default_registry), exc)
        return sorted(out, key=lambda m: m.modified_at, reverse=True)

    def model_path(self, resolved: ResolvedModel) -> Path:
        """The GGUF blob for a gguf model, else a directory of symlinks to its files."""
        if resolved.spec.format == "gguf":
            for layer in resolved.layers:
                if layer["mediaType"] in mt.GGUF_TYPES:
                    return self.blob_path(layer["digest"])
            raise IntegrityError(f"model '{resolved.display}' has no GGUF layer")
        return links.build_links(self.links_dir, self.blobs_dir, resolved.digest.split(":")[1], resolved.layers)

    def adapter_path(self, resolved: ResolvedModel) -> Path | None:
        if not any(l["mediaType"] in mt.ADAPTER_TYPES for l in resolved.layers):
            return None
        return (
            links.build_links(self.links_dir, self.blobs_dir, resolved.digest.split(":")[1], resolved.layers)
            / "adapter"
        )

    # ------------------------------------------------------------------ integrity

    def load_path(self, resolved: ResolvedModel) -> Path:
        """Verify every blob of the model, then give the path a loader opens (``model_path``)."""
        self.verify_for_load(resolved)
        return self.model_path(resolved)

    def verify_for_load(self, resolved: ResolvedModel) -> None:
        """Raise IntegrityError unless every blob of the model is present and intact."""
        for desc in [resolved.manifest["config"], *resolved.layers]:
            try:
                self._verifier.check(desc["digest"], desc["size"])
            except IntegrityError as exc:
                raise IntegrityError(
                    f"{exc} (model '{resolved.display}' cannot be loaded; re-create or re-pull it)",
                    digest=desc["digest"],
                    model=resolved.display,
                ) from None

    def verify(self, name: str | None = None) -> list[dict]:
        """Re-hash every blob of one model (or all models); one report row per blob."""
        if name is not None:
            mn = self.parse(name)
            path = self.manifest_path(mn)
            if not path.is_file():
                raise ModelNotFound(name)
            targets = [(mn, path)]
        else:
            targets = list(self.iter_manifests())
        seen: dict[str, str | None] = {}
        rows = []
        for mn, path in targets:
            display = mn.display(self.default_registry)
            try:
                doc = mt.parse_manifest(path.read_bytes(), display)
            except (OSError, IntegrityError) as exc:
                rows.append({"model": display, "digest": None, "ok": False, "problem": str(exc)})
                continue
            for desc in [doc["config"], *doc["layers"]]:
                digest = desc["digest"]
                if digest not in seen:
                    try:
                        self._verifier.check(digest, desc["size"], full=True)
                        seen[digest] = None
                    except (IntegrityError, OSError) as exc:  # OSError: an unreadable blob
                        seen[digest] = str(exc)
                rows.append({"model": display, "digest": digest, "ok": seen[digest] is None, "problem": seen[digest]})
        return rows

    # ------------------------------------------------------------------ writing

    def _put_file(self, src: Path, progress: Progress, new: list[Path]) -> tuple[str, int]:
        # Hash first, so a layer the store already has costs a read and no write.
        digest, size = fsutil.hash_file(src)
        dest = self.blob_path(digest)
        if dest.is_file() and dest.stat().st_size == size:
            progress({"status": f"using existing layer {digest}"})
            return digest, size
        progress({"status": f"creating new layer {digest}"})
        tmp = fsutil.temp_path(self.tmp_dir, "blob")
        try:
            with open(tmp, "wb") as f:
                got, _ = fsutil.write_chunks(f, fsutil.read_chunks(src))
            if got != digest:
                raise BadRequest(f"{src.name} changed while it was being imported")
            fsutil.publish(tmp, dest)
            new.append(dest)
        finally:
            tmp.unlink(missing_ok=True)
        self._fault("blob")
        return digest, size

    def _put_bytes(self, data: bytes, progress: Progress, new: list[Path]) -> tuple[str, int]:
        digest = fsutil.sha256_bytes(data)
        dest = self.blob_path(digest)
        if dest.is_file() and dest.stat().st_size == len(data):
            progress({"status": f"using existing layer {digest}"})
        else:
            progress({"status": f"creating new layer {digest}"})
            fsutil.atomic_write(dest, data, self.tmp_dir)
            new.append(dest)
            self._fault("blob")
        return digest, len(data)

    def _put_layer(self, src: importers.LayerSource, progress: Progress, new: list[Path]) -> dict:
        if src.digest is not None:  # shared with the model this one is created FROM
            path = self.blob_path(src.digest)
            if not path.is_file() or path.stat().st_size != src.size:
                raise IntegrityError(
                    f"blob {src.digest} of the base model is missing or truncated; re-create or re-pull the base model"
                )
            progress({"status": f"using existing layer {src.digest}"})
            return mt.descriptor(src.media_type, src.digest, src.size, src.title)
        digest, size = self._put_file(src.path, progress, new)
        return mt.descriptor(src.media_type, digest, size, src.title)

    def _discard(self, blobs: list[Path]) -> None:
        """Remove the blobs a failed create wrote, unless a manifest names one (another writer
        may have published the same bytes meanwhile); leaves them if any manifest is unreadable
        (prune decides then)."""
        referenced: set[str] = set()
        for mn, path in self.iter_manifests():
            try:
                doc = mt.parse_manifest(path.read_bytes(), mn.display(self.default_registry))
            except (OSError, IntegrityError):
                return
            referenced |= mt.referenced_digests(doc)
        for blob in blobs:
            if blob.name.replace("-", ":", 1) not in referenced:
                blob.unlink(missing_ok=True)
        if blobs:
            fsutil.fsync_dir(self.blobs_dir)

    def _write_manifest(self, mn: ModelName, data: bytes) -> None:
        path = self.manifest_path(mn)
        fsutil.makedirs_durable(path.parent, self.manifests_dir)
        fsutil.atomic_write(path, data, self.tmp_dir)

    def write_manifest(self, name: str, data: bytes) -> None:
        """Publish a manifest whose blobs are all in the store (used by pull)."""
        mn = self.parse(name)
        doc = mt.parse_manifest(data, mn.display(self.default_registry))
        for digest in mt.referenced_digests(doc):
            if not self.has_blob(digest):
                raise IntegrityError(f"blob {digest} is missing")
        self._write_manifest(mn, data)

    def ingest_blob(self, digest: str, chunks: Iterable[bytes]) -> None:
        """Store an uploaded blob; its bytes must hash to ``digest`` or nothing is kept."""
        dest = self.blob_path(digest)
        with self.writing():
            tmp = fsutil.temp_path(self.tmp_dir, "upload")
            try:
                with open(tmp, "wb") as f:
                    got, _ = fsutil.write_chunks(f, chunks)
                if got != digest:
                    raise DigestMismatch(f"digest mismatch: expected {digest}, got {got}")
                # The marker keeps prune from deleting the blob before a create names it.
                (self.uploads_dir / dest.name).touch()
                fsutil.publish(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ create

    def create(
        self,
        name: str,
        modelfile: str | Modelfile,
        *,
        base_dir: Path,
        progress: Progress | None = None,
        quantize: str | None = None,
        files: dict[str, str] | None = None,
        on_validated: Callable[[], None] | None = None,
    ) -> ResolvedModel:
        """Create (or replace) ``name`` from a Modelfile (text, or parsed by an API handler).
        ``files`` ({file name: digest} of uploaded blobs) stands for FROM. ``on_validated`` is
        called once the source has been checked, before anything is written: a failure before
        it is the request's fault. A failed create leaves no manifest, blob or temp file."""
        emit: Progress = progress or (lambda _status: None)
        target = self.parse(name)
        emit({"status": "parsing modelfile"})
        mf = parse_modelfile(modelfile) if isinstance(modelfile, str) else modelfile
        if mf.adapter is not None:
            raise BadRequest(create_steps.ADAPTERS_UNSUPPORTED)
        if mf.template is not None:
            check_template(mf.template)
        Options.from_dict(mf.parameters)  # bad parameters: refused before any slow work
        told = False

        def validated() -> None:  # once: before a conversion, else after the spec is built
            nonlocal told
            if not told and on_validated is not None:
                told = True
                on_validated()

        old = self.manifest_path(target)
        old_bytes = old.read_bytes() if old.is_file() else None
        new: list[Path] = []
        with self.writing():
            workdir = Path(tempfile.mkdtemp(prefix="create-", dir=self.tmp_dir))
            try:
                imported = create_steps.import_source(
                    self, mf, Path(base_dir).expanduser(), workdir, emit, quantize, files, validated
                )
                spec = create_steps.apply_modelfile(imported, mf)
                validated()
                layers = [self._put_layer(src, emit, new) for src in imported.layers]
                for media_type, text in create_steps.text_layers(spec):
                    digest, size = self._put_bytes(text, emit, new)
                    layers.append(mt.descriptor(media_type, digest, size))
                digest, size = self._put_bytes(spec.to_json(), emit, new)
                config = mt.descriptor(mt.SPEC_MEDIA_TYPE, digest, size)
                data = mt.build_manifest(config, layers)
                self._fault("before_manifest")
                emit({"status": "writing manifest"})
                self._write_manifest(target, data)
            except BaseException:
                self._discard(new)
                raise
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        if old_bytes is not None and old_bytes != data:
            self.prune()  # the replaced manifest may have been the last user of some blobs
        emit({"status": "success"})
        return self.resolve(name)

    # ------------------------------------------------------------------ delete, copy, prune

    def delete(self, name: str) -> None:
        mn = self.parse(name)
        path = self.manifest_path(mn)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(name) from None
        fsutil.fsync_dir(path.parent)
        for d in (path.parent, path.parent.parent, path.parent.parent.parent):
            try:
                d.rmdir()  # only succeeds when empty
            except OSError:
                break
        self.prune()

    def copy(self, src: str, dst: str) -> None:
        src_name, dst_name = self.parse(src), self.parse(dst)
        try:
            data = self.manifest_path(src_name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(src) from None
        mt.parse_manifest(data, src_name.display(self.default_registry))
        with self.writing():
            self._write_manifest(dst_name, data)

    def prune(self) -> int:
        """Delete blobs no manifest references; returns how many. Uploaded blobs get a grace
        period (``UPLOAD_GRACE_S``); partial downloads are never touched."""
        with fsutil.file_lock(self._lock_path, exclusive=True):
            return gc.collect(self)
