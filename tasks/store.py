"""Artifact store: stage outputs on the local disk or S3, committed atomically by a manifest.

Layout under the store root::

    <root>/<stage>/<cache_key>/<attempt>/...files...   the payload of one attempt
    <root>/<stage>/<cache_key>/MANIFEST.json           written last; names the attempt and every file's digest

An output exists only once its manifest does, so a stage killed half-way leaves an orphan attempt
folder that nothing reads as complete. Two writers of the same key write separate attempts and the
last manifest wins; both describe identical content because the key fixes the content.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import fsspec

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
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
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
        try:
            yield pending
            files = directory_manifest(local)
            if not files:
                raise ArtifactError(f"stage {stage} wrote no files; refusing to commit an empty output")
            if not self.is_local:
                self.fs.put(str(local) + "/", f"{base}/attempt-{attempt}/", recursive=True)
            manifest = {
                "stage": stage,
                "cache_key": key,
                "attempt": f"attempt-{attempt}",
                "files": files,
                "digest": content_digest(files),
                "metadata": pending.metadata,
            }
            self._write_manifest(base, manifest)
            pending.ref = Ref(uri=self.uri_for(stage, key), digest=manifest["digest"])
        except BaseException:
            if self.is_local:
                shutil.rmtree(local, ignore_errors=True)
            raise
        finally:
            if cleanup:
                shutil.rmtree(local, ignore_errors=True)

    def _write_manifest(self, base: str, manifest: dict) -> None:
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        target = f"{base}/{MANIFEST}"
        if self.is_local:
            tmp = Path(base) / f".{MANIFEST}.{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            os.replace(tmp, target)  # atomic on POSIX
        else:
            with self.fs.open(target, "wb") as f:  # a single PUT: visible whole or not at all
                f.write(data)

    # ---- reading ------------------------------------------------------------------------
    def read_manifest(self, uri: str) -> dict | None:
        path = f"{self._path_of_uri(uri)}/{MANIFEST}"
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache(path)
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def lookup(self, stage: str, key: str) -> Ref | None:
        """The committed output for (stage, key), if one exists."""
        uri = self.uri_for(stage, key)
        manifest = self.read_manifest(uri)
        return Ref(uri=uri, digest=manifest["digest"]) if manifest else None

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


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check(local: Path, manifest: dict, ref: Ref) -> None:
    for name, meta in manifest["files"].items():
        path = local / name
        if not path.is_file():
            raise ArtifactError(f"{ref.uri}: file {name} listed in the manifest is missing")
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            raise ArtifactError(f"{ref.uri}: file {name} does not match its recorded sha256 (corrupted)")
