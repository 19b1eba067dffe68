"""Fail fast on remote paths: every URL in a config is probed once, with a timeout, at start-up.

Without this a ``gs://`` path on a machine without credentials or network hangs for a minute
or more inside gcsfs's retries and then prints a 150-line traceback about DNS. The probe asks
the filesystem one cheap question (does the path exist) within ``remote_timeout_s`` and turns
any failure into one line naming the URL and the config key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from torchxla_rlhf.errors import RemoteError, call_with_timeout

LOCAL_PROTOCOLS = ("file", "local", "memory")
"""fsspec protocols that never touch the network (memory:// is what the tests use)."""


def iter_urls(cfg: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(key, url)`` for every string field of a config tree that is a remote URL."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from iter_urls(value, f"{key}.")
        elif isinstance(value, str) and "://" in value:
            if value.split("://", 1)[0] not in LOCAL_PROTOCOLS:
                yield key, value


def probe_url(key: str, url: str, timeout_s: float) -> None:
    """Reach ``url``'s filesystem within ``timeout_s`` (existence of the path itself is not
    required: an ``output_dir`` may not exist yet)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise RemoteError(f"{key}={url}: {e} (on a TPU VM: pip install -e '.[tpu]' brings gcsfs)") from None
    except ValueError as e:
        raise RemoteError(f"{key}={url}: not a URL fsspec understands ({e})") from None
    hint = ("check the network and credentials (gcloud auth application-default login, or "
            "GOOGLE_APPLICATION_CREDENTIALS)" if url.startswith("gs://") else "")
    call_with_timeout(lambda: fs.exists(path), timeout_s, f"{key}={url}", hint)


def check_remote_paths(cfg: Any, timeout_s: float) -> None:
    """Probe every remote URL of ``cfg``; raises :class:`RemoteError` on the first failure."""
    for key, url in iter_urls(cfg):
        probe_url(key, url, timeout_s)


def hub_error(name: str, e: Exception) -> RemoteError:
    """One line for a failed hub download, naming the model id and the likely cause."""
    import os

    kind = type(e).__name__
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        why = "HF_HUB_OFFLINE is set and it is not in the local HF cache"
    elif "401" in str(e) or "403" in str(e) or "Gated" in kind or "Repository" in kind:
        why = "not found or not accessible (gated models need HF_TOKEN with access)"
    else:
        why = f"could not be downloaded ({kind})"
    return RemoteError(f"model {name!r} on the HF hub: {why}")
