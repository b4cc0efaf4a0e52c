"""Artifact store: stage outputs on the local disk or S3, committed atomically by a manifest.

Layout under the store root::

    <root>/<stage>/<cache_key>/<attempt>/...files...   the payload of one attempt
    <root>/<stage>/<cache_key>/MANIFEST.json           written last; names the attempt and every file's digest

An output exists only once its manifest does, so a stage killed half-way leaves an orphan attempt
folder that nothing reads as complete. The manifest is created exclusively: when two runs write the
same key at once, the first to commit wins, the other removes its own attempt and hands on the
winner's reference, so one key never holds two outputs. A corrupted output (a file that no longer
matches its digest) is quarantined: its manifest is renamed aside, the files stay for inspection,
and the key is free to be computed again.

Verifying a local output does not read its bytes again while they cannot have changed: a file's SHA-256 is
remembered by (device, inode, size, modification time) once computed (`file_sha256`), as git's index does; a
write changes the modification time. A stamp taken within `RACY_SECONDS` of the file's modification time is not
trusted (a write in the same clock tick would leave the time unchanged), so such a file is hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import fsspec

from tasks.machinery.faults import kill_point

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or does not match its recorded digest."""


@dataclass(frozen=True)
class Ref:
    """What stages hand each other: where an output lives and the digest of its content."""

    uri: str
    digest: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Ref":
        return cls(uri=data["uri"], digest=data["digest"])


def state_home() -> Path:
    """The folder that holds all local state (MLflow store, artifacts, Prefect DB, caches)."""
    return Path(os.environ.get("POSTTRAIN_HOME", ".posttrain")).expanduser().resolve()


RACY_SECONDS = 0.5


def _stamps() -> sqlite3.Connection:
    path = state_home() / "cache" / "file-digests.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30)
    db.execute("CREATE TABLE IF NOT EXISTS stamps (device INTEGER, inode INTEGER, size INTEGER, mtime_ns INTEGER, "
               "sha256 TEXT, PRIMARY KEY (device, inode))")
    return db


def file_sha256(path: Path) -> str:
    """SHA-256 of a local file; an unchanged file (same device, inode, size and modification time since a
    stamp that is not racy) is not read again."""
    stat = Path(path).stat()
    key = (stat.st_dev, stat.st_ino)
    with contextlib.closing(_stamps()) as db:
        hit = db.execute("SELECT sha256 FROM stamps WHERE device=? AND inode=? AND size=? AND mtime_ns=?",
                         (*key, stat.st_size, stat.st_mtime_ns)).fetchone()
    if hit:
        return hit[0]
    digest = sha256_file(path)
    if time.time() - stat.st_mtime_ns / 1e9 >= RACY_SECONDS and Path(path).stat().st_mtime_ns == stat.st_mtime_ns:
        with contextlib.closing(_stamps()) as db, db:
            db.execute("INSERT OR REPLACE INTO stamps VALUES (?, ?, ?, ?, ?)",
                       (*key, stat.st_size, stat.st_mtime_ns, digest))
    return digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def digest_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def directory_manifest(local_dir: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} for every file under local_dir, in sorted order."""
    files = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        files[rel] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    return files


def content_digest(files: dict[str, dict]) -> str:
    """Digest of an output's content: the same files with the same bytes give the same digest."""
    return digest_json({name: meta["sha256"] for name, meta in files.items()})


def safe_component(name: str, what: str = "name") -> str:
    """A user-supplied path component that cannot climb out of the store root."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"{what} {name!r} is not a plain file-name component")
    return name


class ArtifactStore:
    """Stage outputs under a root URI (a local path, file://... or s3://...) via fsspec."""

    def __init__(self, root: str, cache_dir: Path | None = None):
        if "://" not in root:
            root = str(Path(root).expanduser().resolve())
        self.root_uri = root.rstrip("/")
        self.fs, self.root_path = fsspec.core.url_to_fs(self.root_uri)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.is_local = bool({"file", "local"} & set(protocols))
        self.cache_dir = cache_dir or state_home() / "cache" / "artifacts"

    # ---- naming -------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root_path.rstrip("/"), *parts])

    def uri_for(self, stage: str, key: str) -> str:
        return f"{self.root_uri}/{safe_component(stage, 'stage')}/{safe_component(key, 'cache key')}"

    def _path_of_uri(self, uri: str) -> str:
        if not uri.startswith(self.root_uri + "/"):
            raise ArtifactError(f"{uri} is not under the artifact root {self.root_uri}")
        return self._path(uri[len(self.root_uri) + 1 :])

    # ---- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def write(self, stage: str, key: str) -> Iterator["PendingOutput"]:
        """Yield a local folder to fill; on a clean exit its files are committed under (stage, key)."""
        attempt = uuid.uuid4().hex[:12]
        base = self._path(safe_component(stage, "stage"), safe_component(key, "cache key"))
        if self.is_local:
            local = Path(base) / f"attempt-{attempt}"
            local.mkdir(parents=True, exist_ok=False)
            cleanup = False
        else:
            local = Path(tempfile.mkdtemp(prefix=f"posttrain-{stage}-"))
            cleanup = True
        pending = PendingOutput(local)
        remote_attempt = f"{base}/attempt-{attempt}"
        try:
            yield pending
            files = directory_manifest(local)
            if not files:
                raise ArtifactError(f"stage {stage} wrote no files; refusing to commit an empty output")
            if not self.is_local:
                self.fs.put(str(local) + "/", remote_attempt + "/", recursive=True)
            manifest = {
                "stage": stage,
                "cache_key": key,
                "attempt": f"attempt-{attempt}",
                "files": files,
                "digest": content_digest(files),
                "metadata": pending.metadata,
            }
            kill_point(f"{stage}:commit")
            winner = self._create_manifest(base, manifest)
            if winner is not None:  # another run committed this key first: keep one output, theirs
                self._remove_attempt(local if self.is_local else remote_attempt)
                pending.superseded_by = winner
                manifest = winner
            pending.ref = Ref(uri=self.uri_for(stage, key), digest=manifest["digest"])
        except BaseException:
            self._remove_attempt(local if self.is_local else remote_attempt)
            raise
        finally:
            if cleanup:
                shutil.rmtree(local, ignore_errors=True)

    def _remove_attempt(self, path) -> None:
        """Best effort: an attempt nothing will read (no manifest names it) is only wasted space."""
        if self.is_local:
            shutil.rmtree(path, ignore_errors=True)
            return
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except Exception:  # the store may be the thing that is failing; the orphan is harmless
            pass

    def _create_manifest(self, base: str, manifest: dict) -> dict | None:
        """Commit the manifest unless the key already has one; returns the existing manifest if so."""
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        target = f"{base}/{MANIFEST}"
        if self.is_local:
            tmp = Path(base) / f".{MANIFEST}.{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            try:
                os.link(tmp, target)  # atomic, and fails if the manifest exists: exactly one writer wins
            except FileExistsError:
                return json.loads(Path(target).read_bytes())
            finally:
                tmp.unlink(missing_ok=True)
            return None
        # One PUT, visible whole or not at all; If-None-Match makes it exclusive where the endpoint
        # supports conditional writes (AWS S3, MinIO), else the last of two identical writers wins.
        existing = self._read_json(target)
        if existing is not None:
            return existing
        try:
            self.fs.pipe_file(target, data, mode="create")
        except OSError:
            existing = self._read_json(target)
            if existing is None:
                raise
            return existing
        return None

    def _read_json(self, path: str) -> dict | None:
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache(path)
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def quarantine(self, uri: str, reason: str) -> str:
        """Take a corrupted output out of use: rename its manifest aside (files kept for inspection)
        so the key can be computed again. Returns where the old manifest went."""
        base = self._path_of_uri(uri)
        aside = f"{base}/{MANIFEST}.corrupt-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.mv(f"{base}/{MANIFEST}", aside)
        except FileNotFoundError:  # another process (or rank) set it aside first
            return aside
        self.fs.pipe_file(f"{aside}.reason.txt", reason.encode())
        return aside

    # ---- reading ------------------------------------------------------------------------
    def read_manifest(self, uri: str) -> dict | None:
        return self._read_json(f"{self._path_of_uri(uri)}/{MANIFEST}")

    def lookup(self, stage: str, key: str) -> Ref | None:
        """The committed output for (stage, key), if one exists."""
        uri = self.uri_for(stage, key)
        manifest = self.read_manifest(uri)
        return Ref(uri=uri, digest=manifest["digest"]) if manifest else None

    def delete(self, stage: str, key: str) -> None:
        """Remove an output (manifest first, so it stops being complete before its files go)."""
        base = self._path(safe_component(stage, "stage"), safe_component(key, "cache key"))
        try:
            self.fs.rm(f"{base}/{MANIFEST}")
        except FileNotFoundError:
            pass
        self.fs.rm(base, recursive=True)

    def list_keys(self, stage: str, prefix: str = "") -> list[str]:
        """Names of the keys under a stage that start with prefix (complete or not)."""
        try:
            entries = self.fs.ls(self._path(safe_component(stage, "stage")), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return [n for n in names if n.startswith(prefix)]

    def exists(self, ref: Ref) -> bool:
        manifest = self.read_manifest(ref.uri)
        return manifest is not None and manifest["digest"] == ref.digest

    def problem(self, ref: Ref) -> str | None:
        """Why the output cannot be used as `ref` (missing, replaced, a file corrupted), or None if it can.
        Local files are hashed; remote ones are checked by size here and hashed when materialized."""
        manifest = self.read_manifest(ref.uri)
        if manifest is None:
            return f"{ref.uri} has no {MANIFEST}"
        if manifest["digest"] != ref.digest:
            return f"{ref.uri} holds content {manifest['digest'][:12]}, not the expected {ref.digest[:12]}"
        remote_dir = f"{self._path_of_uri(ref.uri)}/{manifest['attempt']}"
        if self.is_local:
            try:
                _check(Path(remote_dir), manifest, ref)
            except ArtifactError as e:
                return str(e)
            return None
        try:
            sizes = {p[len(remote_dir) + 1:]: info["size"] for p, info in
                     self.fs.find(remote_dir, detail=True, withdirs=False).items()}
        except FileNotFoundError:
            sizes = {}
        for name, meta in manifest["files"].items():
            if sizes.get(name) != meta["size"]:
                return f"{ref.uri}: file {name} is missing or has the wrong size (corrupted)"
        return None

    def files_uri(self, ref: Ref) -> str:
        """Where a committed output's files are (its attempt folder), as a URI another tool can read."""
        manifest = self.read_manifest(ref.uri)
        if manifest is None:
            raise ArtifactError(f"{ref.uri} has no {MANIFEST}: the output is missing or was never completed")
        return f"{ref.uri}/{manifest['attempt']}"

    def materialize(self, ref: Ref, verify: bool = True) -> Path:
        """A local folder holding the output's files, checked against the recorded digests."""
        manifest = self.read_manifest(ref.uri)
        if manifest is None:
            raise ArtifactError(f"{ref.uri} has no {MANIFEST}: the output is missing or was never completed")
        if manifest["digest"] != ref.digest:
            raise ArtifactError(
                f"{ref.uri} holds content {manifest['digest'][:12]}, not the expected {ref.digest[:12]}"
            )
        remote_dir = f"{self._path_of_uri(ref.uri)}/{manifest['attempt']}"
        if self.is_local:
            local = Path(remote_dir)
        else:
            local = self.cache_dir / ref.digest
            if not (local / MANIFEST).exists():
                tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=_ensure(self.cache_dir)))
                self.fs.get(remote_dir + "/", str(tmp) + "/", recursive=True)
                _check(tmp, manifest, ref)
                (tmp / MANIFEST).write_text(json.dumps(manifest))
                try:
                    os.replace(tmp, local)
                except OSError:  # another process finished the same download first
                    shutil.rmtree(tmp, ignore_errors=True)
                return local
        if verify:
            _check(local, manifest, ref)
        return local


class PendingOutput:
    """The folder a stage writes into, plus metadata stored in the manifest."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata: dict = {}
        self.ref: Ref | None = None
        self.superseded_by: dict | None = None  # the manifest of a run that committed the same key first


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check(local: Path, manifest: dict, ref: Ref) -> None:
    for name, meta in manifest["files"].items():
        path = local / name
        if not path.is_file():
            raise ArtifactError(f"{ref.uri}: file {name} listed in the manifest is missing")
        if path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
            raise ArtifactError(f"{ref.uri}: file {name} does not match its recorded sha256 (corrupted)")
