"""Open an object store from the URL in IMAG's configuration."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from storage.base import ObjectStore

_ACCEPTED = "file:///absolute/path, a plain filesystem path, or s3://bucket[/prefix]"


def open_store(
    url: str, *, s3_endpoint_url: str | None = None, s3_region: str | None = None
) -> ObjectStore:
    """Return the store named by ``url``.

    One string in the configuration picks both backend and location, so moving
    an archive from disk to S3 is a configuration change, not a code change.
    Backends are imported lazily so a filesystem-only install never imports boto3.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"invalid store URL {url!r}: expected {_ACCEPTED}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()

    if scheme == "file":
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ValueError(f"invalid store URL {url!r}: expected {_ACCEPTED}")
        path = unquote(parts.path)
        if not path or not Path(path).is_absolute():
            raise ValueError(f"invalid store URL {url!r}: file URLs need an absolute path")
        from storage.filesystem import FilesystemStore

        return FilesystemStore(path)

    if scheme == "s3":
        bucket = parts.netloc
        if not bucket or parts.query or parts.fragment:
            raise ValueError(f"invalid store URL {url!r}: expected {_ACCEPTED}")
        from storage.s3 import S3Store

        return S3Store(
            bucket,
            prefix=unquote(parts.path).strip("/"),
            endpoint_url=s3_endpoint_url,
            region=s3_region,
        )

    # A plain path: no scheme, or a Windows drive letter ("C:\\archive") that
    # urlsplit mistakes for a one-letter scheme.
    if scheme == "" or (len(scheme) == 1 and scheme.isalpha()):
        from storage.filesystem import FilesystemStore

        return FilesystemStore(Path(url).expanduser())

    raise ValueError(f"unsupported store URL {url!r}: expected {_ACCEPTED}")
