"""What identifies an input, for cache keys and lineage: a local file's SHA-256 (remembered while the file is
unchanged), an object's metadata stamp in an object store, a folder's content digest, a Hub repo's commit.
Machinery every stage may use; it knows nothing of data shapes or stage kinds."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

logger = logging.getLogger("posttrain")


class DataError(ValueError):
    """A data set cannot be used; the message names the source, the row and the problem."""


def _object_digest(uri: str) -> str:
    import fsspec

    from tasks.machinery.store import digest_json

    fs, path = fsspec.core.url_to_fs(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataError(f"{uri}: file not found") from None
    stamp = {k: info[k] for k in ("VersionId", "ETag", "etag", "md5Hash", "crc32c", "checksum") if info.get(k)}
    if not stamp:  # a store without content metadata: hash the bytes
        with fs.open(path, "rb") as f:
            stamp = {"sha256": hashlib.file_digest(f, "sha256").hexdigest()}
    return digest_json({"uri": uri, "size": info.get("size"), **stamp})


def _folder_digest(folder: Path) -> str:
    from tasks.machinery.store import content_digest

    return content_digest({str(p.relative_to(folder)): {"sha256": file_digest(p)}
                           for p in sorted(folder.rglob("*")) if p.is_file()})


def file_digest(path: Path) -> str:
    """SHA-256 of a local file, remembered while the file is unchanged (tasks.machinery.store.file_sha256)."""
    from tasks.machinery.store import file_sha256

    return file_sha256(Path(path).resolve())


COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_hub_revision(repo: str, revision: str | None, repo_type: str) -> str | None:
    """The commit a Hub repo's revision (branch, tag or commit; default main) points at, or None when it
    cannot be known here (offline, and not in the local Hub cache): the run must then download it.

    A full commit id is used as given; otherwise the Hub is asked, or offline the local Hub cache's refs.
    A missing repo or revision is a DataError (permanent: never retried)."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().repo_info(repo, revision=revision, repo_type=repo_type).sha
        except RepositoryNotFoundError:
            raise DataError(f"{repo}: no such {repo_type} on the Hugging Face Hub (or it is private and no token "
                            "is set)") from None
        except RevisionNotFoundError:
            raise DataError(f"{repo}: the Hub has no revision {revision!r}") from None
        except Exception as e:  # the Hub unreachable: the run resolves it when it downloads
            logger.warning("%s: cannot ask the Hub for its commit (%s); the cache key is not pinned", repo, e)
            return None
    ref = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None
