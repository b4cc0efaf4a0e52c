"""Checks run before any compute: the services a recipe names answer, and its base model exists."""

from __future__ import annotations

import urllib.error
import urllib.request

from flows.config import PipelineConfig
from tasks.tracking import redact


class PreflightError(RuntimeError):
    """A service or input named by the recipe cannot be reached; the message names the setting."""


def check_tracking(uri: str, timeout: float = 10.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status >= 500:
                raise PreflightError(f"tracking.uri {redact(uri)}: MLflow server answered HTTP {response.status}")
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise PreflightError(f"tracking.uri {redact(uri)}: MLflow server answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PreflightError(f"tracking.uri {redact(uri)}: MLflow server unreachable ({reason})") from None


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


def check_base_model(cfg: PipelineConfig) -> None:
    if cfg.pretrain.enabled or not cfg.model.base:
        return
    from tasks.modeling import resolve_base_model

    try:
        resolve_base_model(cfg.model.base)
    except FileNotFoundError as e:
        raise PreflightError(str(e)) from None


def preflight(cfg: PipelineConfig) -> None:
    """Raise PreflightError for the first setting that points at something unusable."""
    resolved = cfg.resolved()
    check_tracking(resolved.tracking.uri)
    check_storage(resolved.storage.root)
    check_base_model(resolved)
