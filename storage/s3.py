"""Object store on S3 (AWS, MinIO, Ceph RGW, ...) through boto3.

S3 puts are atomic by nature: an object appears whole or not at all, and a
failed multipart upload is aborted by boto3's transfer manager. Credentials
come from boto3's default chain (environment, profile, instance role); this
module deliberately takes none so they never end up in IMAG's configuration.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from collections.abc import Iterator
from typing import Any, BinaryIO, NoReturn

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from storage.base import ObjectNotFound, ObjectStore, StorageError, validate_key

_MIB = 1024 * 1024
# S3 allows at most 10 000 parts per multipart upload; stay a little below.
_MAX_PARTS = 9000
_MIN_CHUNK = 8 * _MIB
# Error codes S3 (and compatibles) use for an absent key; HEAD has no body, only "404".
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _http_status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


class S3Store(ObjectStore):
    """Durable key -> bytes store in one bucket, optionally below a key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold: int = 64 * _MIB,
    ) -> None:
        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)  # same safety rules as keys: no "..", no empty segments
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.multipart_threshold = multipart_threshold
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            # Custom endpoints (MinIO, moto, on-premise gateways) rarely have
            # wildcard DNS for virtual-hosted buckets; path style always works.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint_url!r})"

    # -- helpers -----------------------------------------------------------

    def _full_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, op: str, key: str, exc: Exception) -> NoReturn:
        """Translate a boto error into ObjectNotFound or StorageError and raise it."""
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            if code in _NOT_FOUND_CODES:
                raise ObjectNotFound(key) from exc
            msg = exc.response.get("Error", {}).get("Message", "") or str(exc)
            raise StorageError(
                f"{op} {key!r} in {self.url} failed: {code or _http_status(exc)} {msg}"
            ) from exc
        raise StorageError(f"{op} {key!r} in {self.url} failed: {exc}") from exc

    def _transfer_config(self, size: int | None) -> TransferConfig:
        """Multipart settings: parts of at least 8 MiB, more when the object
        would otherwise need more parts than S3 allows."""
        chunk = _MIN_CHUNK if size is None else max(_MIN_CHUNK, math.ceil(size / _MAX_PARTS))
        return TransferConfig(
            multipart_threshold=self.multipart_threshold, multipart_chunksize=chunk
        )

    # -- bucket ------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests, ``imag serve`` start-up)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                self._fail("head_bucket", self.bucket, exc)
        except BotoCoreError as exc:
            self._fail("head_bucket", self.bucket, exc)
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self.region or self._client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou",):
                self._fail("create_bucket", self.bucket, exc)
        except BotoCoreError as exc:
            self._fail("create_bucket", self.bucket, exc)

    # -- writing -----------------------------------------------------------

    def put(self, key: str, data: bytes | BinaryIO) -> int:
        full = self._full_key(key)
        if isinstance(data, bytes | bytearray | memoryview):
            body = bytes(data) if not isinstance(data, bytes) else data
            if len(body) < self.multipart_threshold:
                return self._put_small(key, full, body)
            return self._upload(key, full, io.BytesIO(body), len(body))
        if not hasattr(data, "read"):
            raise TypeError(f"data must be bytes-like or a binary file object, not {type(data)!r}")
        size = _remaining_size(data)
        if size is None:
            counter = _CountingReader(data)
            self._upload(key, full, counter, None)
            return counter.count
        return self._upload(key, full, data, size)

    def _put_small(self, key: str, full: str, body: bytes) -> int:
        # Content-MD5 makes S3 reject a body corrupted in transit; it is the
        # integrity check every S3-compatible server understands.
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=full, Body=body, ContentLength=len(body), ContentMD5=md5
            )
        except (ClientError, BotoCoreError) as exc:
            self._fail("put", key, exc)
        return len(body)

    def _upload(self, key: str, full: str, fileobj: BinaryIO, size: int | None) -> int:
        """Streamed upload; multipart above the threshold, aborted on failure so
        no partial object ever becomes visible."""
        try:
            self._client.upload_fileobj(
                fileobj, self.bucket, full, Config=self._transfer_config(size)
            )
        except (ClientError, BotoCoreError) as exc:
            self._fail("put", key, exc)
        return size if size is not None else 0

    def delete(self, key: str) -> None:
        full = self._full_key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return
            self._fail("delete", key, exc)
        except BotoCoreError as exc:
            self._fail("delete", key, exc)

    # -- reading -----------------------------------------------------------

    def get(self, key: str) -> bytes:
        full = self._full_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            with response["Body"] as body:
                return body.read()
        except (ClientError, BotoCoreError) as exc:
            self._fail("get", key, exc)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        full = self._full_key(key)
        if start < 0 or length < 0:
            raise ValueError(f"get_range {key!r}: start and length must be >= 0")
        if length == 0:
            self.size(key)  # still report a missing object
            return b""
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes={start}-{start + length - 1}"
            )
            with response["Body"] as body:
                return body.read()
        except ClientError as exc:
            if _error_code(exc) == "InvalidRange" or _http_status(exc) == 416:
                return b""  # the range starts at or past the end of the object
            self._fail("get_range", key, exc)
        except BotoCoreError as exc:
            self._fail("get_range", key, exc)

    def open(self, key: str) -> BinaryIO:
        full = self._full_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
        except (ClientError, BotoCoreError) as exc:
            self._fail("open", key, exc)
        raw = _BodyReader(response["Body"], self, key)
        return io.BufferedReader(raw, buffer_size=_MIB)  # type: ignore[return-value]

    def size(self, key: str) -> int:
        full = self._full_key(key)
        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])
        except (ClientError, BotoCoreError) as exc:
            self._fail("size", key, exc)

    def exists(self, key: str) -> bool:
        # Note: HEAD on a missing bucket is also a bare 404, so that reads as False too.
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(base) :]
        except (ClientError, BotoCoreError) as exc:
            self._fail("iter_keys", prefix, exc)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()


def _remaining_size(f: BinaryIO) -> int | None:
    """Bytes left in a seekable file (its position is kept), or None if it cannot seek."""
    try:
        if not f.seekable():
            return None
        pos = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(pos)
    except (AttributeError, OSError, ValueError):
        return None
    return max(0, end - pos)


class _CountingReader(io.RawIOBase):
    """Non-seekable pass-through that counts bytes, for streams of unknown length.

    boto3 buffers each part of a non-seekable source, so every byte is read
    exactly once and the count is the object size. ``read(n)`` keeps reading
    until it has ``n`` bytes or the source ends: s3transfer takes one short read
    as "below the threshold" (and then loads the whole rest into memory) or
    sends undersized parts, which S3 rejects; pipes and sockets read short.
    """

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.count = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self._read_some(_MIB):
                parts.append(chunk)
            return b"".join(parts)
        buf = bytearray()
        while len(buf) < size:
            chunk = self._read_some(size - len(buf))
            if not chunk:
                break
            buf += chunk
        return bytes(buf)

    def _read_some(self, size: int) -> bytes:
        chunk = self._source.read(size)
        if chunk is None:  # a non-blocking source with nothing ready: not supported
            raise StorageError("put: the data stream returned no data (non-blocking?)")
        if isinstance(chunk, str):
            raise TypeError("data file object must be opened in binary mode")
        self.count += len(chunk)
        return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


class _BodyReader(io.RawIOBase):
    """Raw stream over a botocore StreamingBody so that ``open`` returns a
    proper BinaryIO (read(n), readinto, context manager) and network errors
    mid-stream surface as StorageError like everything else."""

    def __init__(self, body: Any, store: S3Store, key: str) -> None:
        self._body = body
        self._store = store
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            chunk = self._body.read(len(buffer))
        except (BotoCoreError, OSError) as exc:
            self._store._fail("open/read", self._key, exc)
        n = len(chunk)
        buffer[:n] = chunk
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._body.close()
            finally:
                super().close()
