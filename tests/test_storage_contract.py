"""One behavioural contract for every object store backend.

The archive must not care whether objects sit on disk or in S3, so the same
tests run against both; backend-specific guarantees (temp files, sharding)
follow at the end.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from storage import ObjectNotFound, ObjectStore, StorageError, open_store
from storage.filesystem import FilesystemStore
from storage.s3 import S3Store

MIB = 1024 * 1024
S3_PREFIX = "archive/v1"
SMALL_MULTIPART_THRESHOLD = 5 * MIB + 1  # S3's minimum part size is 5 MiB


BACKENDS = [
    pytest.param("filesystem", id="filesystem"),
    pytest.param("s3", id="s3", marks=pytest.mark.s3),
]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "filesystem":
        s: ObjectStore = FilesystemStore(tmp_path / "objects")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        endpoint = request.getfixturevalue("s3_env")
        s = S3Store(bucket, prefix=S3_PREFIX, endpoint_url=endpoint)
    yield s
    s.close()


@pytest.fixture(params=BACKENDS)
def big_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """A store whose S3 flavour switches to multipart above ~5 MiB."""
    if request.param == "filesystem":
        s: ObjectStore = FilesystemStore(tmp_path / "objects")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        endpoint = request.getfixturevalue("s3_env")
        s = S3Store(
            bucket,
            prefix=S3_PREFIX,
            endpoint_url=endpoint,
            multipart_threshold=SMALL_MULTIPART_THRESHOLD,
        )
    yield s
    s.close()


def _payload(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (a repeated pattern could hide
    off-by-one-chunk bugs)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


class _NonSeekable(io.RawIOBase):
    """A pipe-like stream: read() only, no seek/tell, short reads allowed."""

    def __init__(self, data: bytes, read_size: int = 300_000) -> None:
        self._buf = io.BytesIO(data)
        self._read_size = read_size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        chunk = self._buf.read(min(len(b), self._read_size))
        b[: len(chunk)] = chunk
        return len(chunk)


class _Exploding(io.RawIOBase):
    """Yields some bytes, then fails like a dropped network connection."""

    def __init__(self, good: bytes) -> None:
        self._good = io.BytesIO(good)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        chunk = self._good.read(len(b))
        if not chunk:
            raise RuntimeError("source went away mid-stream")
        b[: len(chunk)] = chunk
        return len(chunk)


KEY = "1.2.840.10008/1.2.3.4/1.2.3.4.5.dcm"


def _s3_client(store: S3Store) -> Any:
    """A separate client to look behind the store's back (ETags, pending uploads)."""
    import boto3

    return boto3.client("s3", endpoint_url=store.endpoint_url, region_name="us-east-1")


# -- the contract ----------------------------------------------------------


def test_put_then_get_returns_identical_bytes(store: ObjectStore) -> None:
    data = _payload(100_000)
    assert store.put(KEY, data) == len(data)
    assert store.get(KEY) == data


def test_put_accepts_bytearray_memoryview_and_empty(store: ObjectStore) -> None:
    assert store.put("a/bytearray", bytearray(b"abc")) == 3
    assert store.put("a/memoryview", memoryview(b"xyz0123")[3:]) == 4
    assert store.put("a/empty", b"") == 0
    assert store.get("a/bytearray") == b"abc"
    assert store.get("a/memoryview") == b"0123"
    assert store.get("a/empty") == b""
    assert store.size("a/empty") == 0


def test_put_replaces_existing_object_atomically(store: ObjectStore) -> None:
    store.put(KEY, b"old contents, longer than the new ones")
    assert store.put(KEY, b"new") == 3
    assert store.get(KEY) == b"new"
    assert store.size(KEY) == 3
    assert list(store.iter_keys()) == [KEY]


def test_get_range_returns_slice_and_short_read_at_end(store: ObjectStore) -> None:
    data = _payload(10_000)
    store.put(KEY, data)
    assert store.get_range(KEY, 0, 10) == data[:10]
    assert store.get_range(KEY, 1234, 500) == data[1234:1734]
    assert store.get_range(KEY, 9_990, 100) == data[9_990:]
    assert store.get_range(KEY, 10_000, 10) == b""
    assert store.get_range(KEY, 50_000, 10) == b""
    assert store.get_range(KEY, 5, 0) == b""


def test_get_range_of_empty_object_is_empty(store: ObjectStore) -> None:
    store.put(KEY, b"")
    assert store.get_range(KEY, 0, 10) == b""


def test_get_range_rejects_negative_arguments(store: ObjectStore) -> None:
    store.put(KEY, b"abc")
    with pytest.raises(ValueError):
        store.get_range(KEY, -1, 2)
    with pytest.raises(ValueError):
        store.get_range(KEY, 0, -2)


def test_get_missing_raises_object_not_found(store: ObjectStore) -> None:
    for op in (
        store.get,
        lambda k: store.get_range(k, 0, 10),
        lambda k: store.get_range(k, 0, 0),
        store.size,
        store.open,
    ):
        with pytest.raises(ObjectNotFound) as info:
            op("no/such/key")
        assert isinstance(info.value, StorageError)
        assert isinstance(info.value, KeyError)


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put(KEY, b"data")
    store.delete(KEY)
    assert not store.exists(KEY)
    store.delete(KEY)
    store.delete("never/existed")
    with pytest.raises(ObjectNotFound):
        store.get(KEY)


def test_delete_leaves_other_keys_alone(store: ObjectStore) -> None:
    store.put("a/b/one", b"1")
    store.put("a/b/two", b"2")
    store.delete("a/b/one")
    assert store.get("a/b/two") == b"2"
    assert list(store.iter_keys()) == ["a/b/two"]


def test_exists(store: ObjectStore) -> None:
    assert not store.exists(KEY)
    store.put(KEY, b"x")
    assert store.exists(KEY)
    # A "folder" of keys is not itself an object.
    assert not store.exists("1.2.840.10008/1.2.3.4")
    assert not store.exists("1.2.840.10008")


def test_size(store: ObjectStore) -> None:
    store.put(KEY, _payload(12_345))
    assert store.size(KEY) == 12_345


def test_iter_keys_lists_every_key_and_honours_prefix(store: ObjectStore) -> None:
    keys = {
        "study1/series1/inst1",
        "study1/series1/inst2",
        "study1/series2/inst1",
        "study10/series1/inst1",
        "study2/inst1",
        "top-level.dcm",
    }
    for k in keys:
        store.put(k, k.encode())
    assert set(store.iter_keys()) == keys
    assert len(list(store.iter_keys())) == len(keys)
    assert set(store.iter_keys("study1/")) == {k for k in keys if k.startswith("study1/")}
    assert set(store.iter_keys("study1")) == {k for k in keys if k.startswith("study1")}
    assert set(store.iter_keys("study1/series1/inst")) == {
        "study1/series1/inst1",
        "study1/series1/inst2",
    }
    assert list(store.iter_keys("nothing-here")) == []


def test_iter_keys_on_empty_store_yields_nothing(store: ObjectStore) -> None:
    assert list(store.iter_keys()) == []


def test_put_from_file_object_streams(big_store: ObjectStore, tmp_path: Path) -> None:
    """~12 MiB so that the S3 store (threshold 5 MiB + 1) really uploads in parts."""
    data = _payload(12 * MIB + 123, seed=1)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    with open(source, "rb") as f:
        assert big_store.put("big/seekable", f) == len(data)
    assert big_store.size("big/seekable") == len(data)
    assert big_store.get("big/seekable") == data

    assert big_store.put("big/pipe", _NonSeekable(data)) == len(data)
    assert big_store.get("big/pipe") == data

    # Bytes above the threshold take the multipart path too.
    assert big_store.put("big/bytes", data) == len(data)
    assert hashlib.sha256(big_store.get("big/bytes")).digest() == hashlib.sha256(data).digest()

    if isinstance(big_store, S3Store):
        # A multipart upload's ETag ends in "-<number of parts>".
        client = _s3_client(big_store)
        for key in ("big/seekable", "big/pipe", "big/bytes"):
            etag = client.head_object(Bucket=big_store.bucket, Key=f"{S3_PREFIX}/{key}")["ETag"]
            assert etag.strip('"').endswith("-2"), (key, etag)
        client.close()


def test_failed_multipart_put_leaves_old_object_and_no_upload_behind(
    big_store: ObjectStore,
) -> None:
    big_store.put(KEY, b"old")
    with pytest.raises(RuntimeError, match="mid-stream"):
        big_store.put(KEY, _Exploding(_payload(11 * MIB)))
    assert big_store.get(KEY) == b"old"
    assert list(big_store.iter_keys()) == [KEY]
    if isinstance(big_store, S3Store):
        client = _s3_client(big_store)
        uploads = client.list_multipart_uploads(Bucket=big_store.bucket).get("Uploads", [])
        assert uploads == []
        client.close()


def test_put_from_file_object_starts_at_current_position(store: ObjectStore) -> None:
    f = io.BytesIO(b"headerPAYLOAD")
    f.seek(6)
    assert store.put(KEY, f) == 7
    assert store.get(KEY) == b"PAYLOAD"


def test_put_from_small_file_object(store: ObjectStore) -> None:
    assert store.put(KEY, io.BytesIO(b"small")) == 5
    assert store.put("k/pipe", _NonSeekable(b"tiny pipe", read_size=2)) == 9
    assert store.get(KEY) == b"small"
    assert store.get("k/pipe") == b"tiny pipe"


def test_put_rejects_text_and_other_types(store: ObjectStore) -> None:
    with pytest.raises(TypeError):
        store.put(KEY, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.put(KEY, 42)  # type: ignore[arg-type]
    assert not store.exists(KEY)


def test_failed_put_leaves_old_object_intact(store: ObjectStore) -> None:
    store.put(KEY, b"old")
    with pytest.raises(RuntimeError, match="mid-stream"):
        store.put(KEY, _Exploding(_payload(3 * MIB)))
    assert store.get(KEY) == b"old"
    assert list(store.iter_keys()) == [KEY]


def test_open_streams_content(big_store: ObjectStore) -> None:
    data = _payload(3 * MIB + 17, seed=2)
    big_store.put(KEY, data)
    with big_store.open(KEY) as f:
        assert f.read(0) == b""
        head = f.read(100)
        assert head == data[:100]
        parts = [head]
        while chunk := f.read(256 * 1024):
            assert len(chunk) <= 256 * 1024
            parts.append(chunk)
        assert f.read(10) == b""
    assert b"".join(parts) == data
    with big_store.open(KEY) as f:
        assert f.read() == data
    f2 = big_store.open(KEY)
    f2.close()
    assert f2.closed


INVALID_KEYS = [
    "",
    "..",
    "a/../b",
    "./a",
    "/absolute/path",
    "a//b",
    "a/",
    "a\\b",
    "with space",
    "nul\x00byte",
    "x" * 1025,
    "caf\u00e9",
]


@pytest.mark.parametrize("bad_key", INVALID_KEYS, ids=repr)
def test_invalid_keys_are_refused(store: ObjectStore, bad_key: str) -> None:
    operations: list[Callable[[], object]] = [
        lambda: store.put(bad_key, b"x"),
        lambda: store.put(bad_key, io.BytesIO(b"x")),
        lambda: store.get(bad_key),
        lambda: store.get_range(bad_key, 0, 1),
        lambda: store.open(bad_key),
        lambda: store.size(bad_key),
        lambda: store.delete(bad_key),
        lambda: store.exists(bad_key),
    ]
    for op in operations:
        with pytest.raises(ValueError, match="invalid object key"):
            op()
    assert list(store.iter_keys()) == []


def test_longest_valid_key_is_accepted(store: ObjectStore) -> None:
    # 1024 characters in segments short enough for any filesystem's name limit.
    key = "/".join(["k" * 200] * 5) + "/" + "z" * 19
    assert len(key) == 1024
    store.put(key, b"long")
    assert store.get(key) == b"long"
    assert list(store.iter_keys()) == [key]


# -- filesystem specifics ----------------------------------------------------


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_filesystem_failed_put_leaves_no_object_and_no_temp_file(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    with pytest.raises(RuntimeError):
        store.put("new/key", _Exploding(_payload(3 * MIB)))
    assert not store.exists("new/key")
    assert _temp_files(tmp_path) == []

    store.put(KEY, b"old")
    with pytest.raises(RuntimeError):
        store.put(KEY, _Exploding(_payload(3 * MIB)))
    assert store.get(KEY) == b"old"
    assert _temp_files(tmp_path) == []
    assert list(store.iter_keys()) == [KEY]


def test_filesystem_objects_land_in_two_hex_shard_levels_of_their_first_segment(
    tmp_path: Path,
) -> None:
    root = tmp_path / "objects"
    store = FilesystemStore(root)
    store.put(KEY, b"sharded")
    h = hashlib.sha1(KEY.split("/")[0].encode()).hexdigest()
    expected = root / h[0:2] / h[2:4] / "1.2.840.10008" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert expected.read_bytes() == b"sharded"
    assert store.path_for(KEY) == expected
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files == [expected]
    # a sibling key (same first segment) shares the folders: one study, one place
    sibling = KEY.rsplit("/", 1)[0] + "/other.dcm"
    store.put(sibling, b"x")
    assert store.path_for(sibling).parent == expected.parent


def test_filesystem_iter_keys_skips_temp_files_and_stray_entries(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = FilesystemStore(root)
    store.put(KEY, b"real")
    final = store.path_for(KEY)
    (final.parent / ".tmp-1.2.3.4.5.dcm-deadbeef").write_bytes(b"partial")
    (root / "README").write_text("not an object")  # files at shard level are not keys
    (root / "notashard").mkdir()
    (root / "notashard" / "ab").mkdir()
    (root / "notashard" / "ab" / "x").write_text("ignored")
    assert list(store.iter_keys()) == [KEY]


def test_filesystem_refuses_keys_that_look_like_temp_files(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    with pytest.raises(ValueError, match="invalid object key"):
        store.put("a/.tmp-x", b"x")


def test_filesystem_cleanup_temp_removes_only_stale_temp_files(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    store.put(KEY, b"real")
    directory = store.path_for(KEY).parent
    stale = directory / ".tmp-1.2.3.4.5.dcm-0123456789abcdef"
    fresh = directory / ".tmp-1.2.3.4.5.dcm-fedcba9876543210"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"a put in progress")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    assert store.cleanup_temp(older_than_seconds=3600) == 1
    assert not stale.exists()
    assert fresh.exists()
    assert store.get(KEY) == b"real"
    assert store.cleanup_temp(older_than_seconds=0) == 1
    assert not fresh.exists()
    assert store.cleanup_temp() == 0
    assert list(store.iter_keys()) == [KEY]


def test_filesystem_delete_prunes_empty_folders(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = FilesystemStore(root)
    store.put(KEY, b"x")
    store.delete(KEY)
    assert list(root.iterdir()) == []
    store.put(KEY, b"again")  # folders are recreated
    assert store.get(KEY) == b"again"


def test_filesystem_store_on_missing_root_is_empty(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "does-not-exist-yet")
    assert list(store.iter_keys()) == []
    assert not store.exists(KEY)
    store.put(KEY, b"x")
    assert (tmp_path / "does-not-exist-yet").is_dir()


def test_filesystem_write_errors_become_storage_error_naming_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "objects"
    blocker.write_text("a file where the root folder should be")
    store = FilesystemStore(blocker)
    with pytest.raises(StorageError, match="1.2.3.4.5.dcm") as info:
        store.put(KEY, b"x")
    assert not isinstance(info.value, ObjectNotFound)


# -- S3 specifics ------------------------------------------------------------


@pytest.mark.s3
def test_s3_keys_live_below_the_store_prefix(s3_bucket: str, s3_env: str) -> None:
    import boto3

    store = S3Store(s3_bucket, prefix=S3_PREFIX, endpoint_url=s3_env)
    other = S3Store(s3_bucket, prefix="archive/v10", endpoint_url=s3_env)
    store.put(KEY, b"x")
    other.put("elsewhere", b"y")
    client = boto3.client("s3", endpoint_url=s3_env)
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert listed == {f"{S3_PREFIX}/{KEY}", "archive/v10/elsewhere"}
    assert list(store.iter_keys()) == [KEY]
    assert list(other.iter_keys()) == ["elsewhere"]
    assert store.url == f"s3://{s3_bucket}/{S3_PREFIX}"


@pytest.mark.s3
def test_s3_ensure_bucket_creates_missing_bucket_and_is_idempotent(s3_env: str) -> None:
    store = S3Store(f"imag-ensure-{os.getpid()}-{time.time_ns()}", endpoint_url=s3_env)
    with pytest.raises(StorageError):
        store.get("any")
    store.ensure_bucket()
    store.ensure_bucket()
    store.put("k", b"v")
    assert store.get("k") == b"v"
    store.delete("k")


@pytest.mark.s3
def test_s3_missing_bucket_is_a_storage_error_not_a_missing_key(s3_env: str) -> None:
    store = S3Store("imag-no-such-bucket", endpoint_url=s3_env)
    with pytest.raises(StorageError, match="imag-no-such-bucket") as info:
        store.get(KEY)
    assert not isinstance(info.value, ObjectNotFound)
    with pytest.raises(StorageError):
        store.put(KEY, b"x")


# -- open_store ----------------------------------------------------------------


def test_open_store_parses_file_urls_and_plain_paths(tmp_path: Path) -> None:
    by_url = open_store((tmp_path / "a b").as_uri())
    assert isinstance(by_url, FilesystemStore)
    assert by_url.root == tmp_path / "a b"
    by_path = open_store(str(tmp_path / "plain"))
    assert isinstance(by_path, FilesystemStore)
    assert by_path.root == tmp_path / "plain"
    assert open_store(f"file://localhost{tmp_path}").root == tmp_path  # type: ignore[attr-defined]


def test_open_store_parses_s3_urls() -> None:
    store = open_store("s3://my-bucket/some/prefix/", s3_endpoint_url="http://127.0.0.1:1")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("my-bucket", "some/prefix")
    assert store.endpoint_url == "http://127.0.0.1:1"
    bare = open_store("s3://my-bucket", s3_region="eu-west-1")
    assert isinstance(bare, S3Store)
    assert (bare.bucket, bare.prefix, bare.region) == ("my-bucket", "", "eu-west-1")
    store.close()
    bare.close()


@pytest.mark.parametrize(
    "url",
    ["http://example.com/x", "ftp://host/path", "s3://", "file://remotehost/x", "file:rel", ""],
)
def test_open_store_rejects_other_urls_naming_url_and_accepted_forms(url: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(url)
    message = str(info.value)
    assert repr(url) in message
    if url:
        assert "s3://bucket" in message or "absolute path" in message


def test_open_store_rejects_unsafe_s3_prefix() -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        open_store("s3://bucket/a/../b")
