"""Checks run before any compute: the services a recipe names answer, and the models it names exist."""

from __future__ import annotations

import urllib.error
import urllib.request

from flows.config import PipelineConfig
from tasks.machinery.tracking import redact, strip_credentials


class PreflightError(RuntimeError):
    """A service or input named by the recipe cannot be reached; the message names the setting."""


def check_tracking(uri: str, timeout: float = 10.0) -> None:
    """The MLflow server answers, and accepts the credentials this process has for it (user:password in
    the URI, or MLFLOW_TRACKING_USERNAME / _PASSWORD), if any."""
    if not uri.startswith(("http://", "https://")):
        return
    base = strip_credentials(uri).rstrip("/")
    _get(f"{base}/health", uri, timeout)
    user, password = _credentials(uri)
    if user is not None:
        import base64

        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        status = _get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", uri, timeout,
                      {"Authorization": f"Basic {token}"})
        if status in (401, 403):
            raise PreflightError(f"tracking.uri {redact(uri)}: the MLflow server refused the credentials "
                                 f"(HTTP {status}); check the password in MLFLOW_TRACKING_URI or MLFLOW_TRACKING_PASSWORD")


def _credentials(uri: str) -> tuple[str | None, str | None]:
    import os
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.username is not None:
        return unquote(parts.username), unquote(parts.password or "")
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    return None, None


def _get(url: str, uri: str, timeout: float, headers: dict | None = None) -> int:
    """The HTTP status of GET url (4xx returned, 5xx and no answer raised, naming the setting)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PreflightError(f"tracking.uri {redact(uri)}: MLflow server unreachable ({reason})") from None
    if status >= 500:
        raise PreflightError(f"tracking.uri {redact(uri)}: MLflow server answered HTTP {status}")
    return status


def check_storage(root: str) -> None:
    if "://" not in root or root.startswith("file://"):
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)  # unlike exists(), raises when the endpoint is down
    except FileNotFoundError:
        raise PreflightError(f"storage.root {root}: bucket {bucket!r} does not exist") from None
    except Exception as e:  # endpoint down, DNS, credentials: s3fs raises many types
        raise PreflightError(f"storage.root {root}: cannot reach the store ({type(e).__name__}: {e})") from None


def check_models(cfg: PipelineConfig) -> None:
    """Every external model a stage reads (Hub id, folder, URI, registry alias) can be found."""
    from tasks.machinery.modeling import resolve_model

    for name, inst in cfg.stages.items():
        for slot, value in inst.inputs.items():
            if value in cfg.stages:
                continue
            try:
                resolve_model(value, cfg.tracking.uri, digest=False)  # the run hashes it, once
            except (FileNotFoundError, ValueError) as e:
                raise PreflightError(f"stages.{name}.inputs.{slot}: {e}") from None


def check_data_sources(cfg: PipelineConfig) -> None:
    """Every Hub data set a prepare_data stage reads exists, at the revision named (when the Hub can be asked);
    every file exists: the source is fingerprinted as the run keys it (a local file's digest is remembered, so
    the run does not read it again). A misspelled name fails here, before any compute, and is never retried."""
    from tasks.machinery.sources import fingerprint

    for where, src in cfg.data_sources().items():
        try:
            fingerprint(src)
        except ValueError as e:
            raise PreflightError(f"stages.{where}: {e}") from None


def preflight(cfg: PipelineConfig) -> None:
    """Raise PreflightError for the first setting that points at something unusable."""
    resolved = cfg.resolved()
    check_tracking(resolved.tracking.uri)
    check_storage(resolved.storage.root)
    check_models(resolved)
    check_data_sources(resolved)
