"""Object storage (``s3://``, ``gs://``, ``az://``, ... any fsspec URL) for experts, sidecars and outputs.

One mechanism, used by every path: **inputs are fetched, outputs are staged.**

- Reading: :func:`fetch` copies a remote file or folder into a local cache once (``LIGHTNING_MERGE_CACHE``, default
  ``~/.cache/lightning-merge``), keyed by URL and revalidated by each object's ETag (or size and modification time),
  so a sweep of merges over the same experts downloads each byte once. A file's sidecar
  (``X.statistics.safetensors``) comes with it. Every reader of the package then reads the local copy, so every
  format (safetensors, sharded folders, ``.ckpt``, PEFT adapters) works unchanged. A download is written under a
  temporary name and renamed, so an interrupted fetch is never mistaken for a complete copy.
- Writing: :func:`staged` yields a local path to write the output into (with the usual atomic local write), then
  uploads it. A single object is atomic on object stores (a PUT, or a multipart upload, appears whole or not at all).
  A folder is uploaded with its **entry point last** (the shard index, else the weights, else the adapter weights):
  before that last object lands the folder is visibly incomplete (no loader accepts it), and when it replaces an
  older output the old entry point is deleted first, so the folder never reads as a mix of two merges.

Credentials and endpoints come from the filesystem's usual configuration (for S3: ``AWS_*`` variables, or
``FSSPEC_S3_ENDPOINT_URL`` / ``FSSPEC_S3_KEY`` ... or an fsspec config file); the protocol's package must be
installed (``pip install s3fs`` / ``gcsfs`` / ``adlfs``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_merge.io import atomic_file

LOCAL_PROTOCOLS = ("file", "local")
# Files whose presence makes a folder loadable, in the order a loader looks for them: uploaded last.
ENTRY_POINTS = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "model.safetensors",
    "adapter_model.safetensors",
    "tall.json",
)


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL of a non-local fsspec filesystem (``s3://bucket/key``); local paths and
    ``file://`` URLs are not."""
    if not isinstance(path, str) or "://" not in path:
        return False
    protocol = path.split("://", 1)[0]
    return bool(protocol) and protocol not in LOCAL_PROTOCOLS and protocol.replace("+", "").isalnum()


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it.

    Raises:
        ValueError: fsspec has no implementation for the protocol, or its package is not installed.
    """
    import fsspec
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as err:
        protocol = url.split("://", 1)[0]
        package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
        hint = f"pip install {package[protocol]}" if protocol in package else "install its fsspec implementation"
        known = ", ".join(sorted(fsspec.available_protocols())[:12])
        raise ValueError(f"'{url}': cannot open the {protocol}:// filesystem ({err}); {hint} (fsspec knows: {known} "
                         "...)") from None


def join(url: str, *parts: str) -> str:
    """``url`` with path components appended (``join("s3://b/run", "x.ckpt")``)."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def _fresh(fs: Any, path: str) -> None:
    """Forget cached listings of ``path``: another process (a training run, another merge) may have written since."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def exists(url: str | os.PathLike) -> bool:
    """Whether an object or folder exists at ``url`` (asked of the store, not of a cached listing); a local path is
    answered by ``os.path.exists``."""
    if not is_url(url):
        return os.path.exists(url)
    fs, path = filesystem(str(url))
    _fresh(fs, path)
    return fs.exists(path)


def remove(url: str) -> None:
    """Delete an object (or a folder, recursively); a missing one is not an error."""
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        if fs.isdir(path):
            fs.rm(path, recursive=True)
        else:
            fs.rm_file(path)


def cache_dir() -> Path:
    """Where fetched objects are kept: ``$LIGHTNING_MERGE_CACHE`` or ``~/.cache/lightning-merge``."""
    root = os.environ.get("LIGHTNING_MERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "lightning-merge")
    return Path(root)


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "generation", "version_id"):
        if info.get(key):
            return str(info[key]).strip('"')
    return f"{info.get('size')}-{info.get('LastModified') or info.get('mtime') or info.get('updated')}"


def _fetch_file(fs: Any, remote: str, info: dict[str, Any], local: Path) -> None:
    """Download one object to ``local`` unless the copy there is of the same version."""
    version = _version(info)
    marker = local.with_name(f".{local.name}.version")
    if local.exists() and marker.exists() and marker.read_text() == version and local.stat().st_size == info["size"]:
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(local) as tmp:
        fs.get_file(remote, str(tmp))
        got = tmp.stat().st_size
        if got != info["size"]:
            raise OSError(f"'{remote}': downloaded {got} bytes of {info['size']} (the object changed or the "
                          "connection dropped); fetch again")
    with atomic_file(marker) as tmp:
        tmp.write_text(version)


def fetch(url: str, companions: tuple[str, ...] = ()) -> Path:
    """A local copy of the remote file or folder ``url`` (downloaded on first use, revalidated by version).

    Args:
        url: the file or folder.
        companions: for a file, names of sibling files fetched beside it when they exist (its sidecar
            ``X.statistics.safetensors``), so the local copy is found with them; a stale local copy of a companion
            that no longer exists remotely is deleted.

    Raises:
        FileNotFoundError: nothing exists at ``url``.
    """
    fs, path = filesystem(url)
    _fresh(fs, path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"'{url}' does not exist") from None
    root = cache_dir() / hashlib.sha256(url.rstrip("/").rsplit("/", 1)[0].encode()).hexdigest()[:24]
    name = path.rstrip("/").rsplit("/", 1)[-1]
    local = root / name
    if info.get("type") == "directory":
        found = fs.find(path, detail=True)
        if not found:
            raise FileNotFoundError(f"'{url}' is an empty folder")
        prefix = path.rstrip("/") + "/"
        wanted: set[str] = set()
        for remote, entry in found.items():
            rel = remote[len(prefix):] if remote.startswith(prefix) else remote.rsplit("/", 1)[-1]
            if not rel or rel.endswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
                continue
            _fetch_file(fs, remote, entry, local / rel)
            wanted.add(rel)
        for item in list(local.rglob("*")):  # files the remote folder no longer has: never read them
            if not item.is_file():
                continue
            marker = item.name.startswith(".") and item.name.endswith(".version")
            subject = item.with_name(item.name[1:-len(".version")]) if marker else item
            if subject.relative_to(local).as_posix() not in wanted:
                item.unlink()
        return local
    _fetch_file(fs, path, info, local)
    for companion in companions:
        remote = path.rsplit("/", 1)[0] + "/" + companion if "/" in path else companion
        try:
            companion_info = fs.info(remote)
        except FileNotFoundError:
            stale = local.with_name(companion)
            if stale.exists():
                stale.unlink()  # gone remotely: never use an old copy of it
        else:
            _fetch_file(fs, remote, companion_info, local.with_name(companion))
    return local


def local_path(path: str | os.PathLike, companions: tuple[str, ...] = ()) -> Path:
    """``Path(path)`` for a local path; for a URL, the local copy (see :func:`fetch`)."""
    return fetch(str(path), companions) if is_url(path) else Path(path)


def glob(folder: str | os.PathLike, pattern: str) -> list[str] | list[Path]:
    """Files in ``folder`` (local or URL) whose names match ``pattern``, sorted: Paths, or URL strings."""
    if not is_url(folder):
        return sorted(Path(folder).glob(pattern))
    fs, path = filesystem(str(folder))
    _fresh(fs, path)
    protocol = str(folder).split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in fs.glob(path.rstrip("/") + "/" + pattern))


def basename(path: str | os.PathLike) -> str:
    """The last component of a local path or URL."""
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else Path(path).name


def refuse_existing(url: str | os.PathLike, overwrite: bool) -> None:
    """The check every output at a URL makes before anything is written.

    Raises:
        FileExistsError: something exists at ``url`` and ``overwrite`` is False.
    """
    if not overwrite and exists(url):
        raise FileExistsError(f"output '{url}' already exists; pass overwrite=True (CLI: --overwrite) to replace it")


def upload(local: Path, url: str, *, replace: bool = True) -> str:
    """Upload a file or folder to ``url``; a folder's entry point last (see the module docs). Returns ``url``.

    Args:
        local: the finished local output.
        url: where it goes.
        replace: an existing output at ``url`` is replaced (its entry point deleted first, then stale files
            that the new output does not have are deleted after the new entry point lands).
    """
    refuse_existing(url, replace)
    fs, path = filesystem(url)
    _fresh(fs, path)
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        rel = [p.relative_to(local).as_posix() for p in files]
        old: list[str] = []
        if fs.exists(path):
            prefix = path.rstrip("/") + "/"
            old = [o[len(prefix):] for o in fs.find(path) if o.startswith(prefix)]
            for entry in ENTRY_POINTS:
                if entry in old:
                    fs.rm_file(prefix + entry)  # from here on the old output is visibly incomplete
        last = [r for r in ENTRY_POINTS if r in rel]
        order = [r for r in rel if r not in last] + last
        for r in order:
            fs.put_file(str(local / r), join(path, r))
        stale = sorted(set(old) - set(rel))
        for r in stale:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(join(path, r))
        return url
    fs.put_file(str(local), path)  # one object: appears whole or not at all
    return url


@contextlib.contextmanager
def staged(url: str, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a local path named like ``url``'s last component to write an output into; on success upload it to
    ``url`` (see :func:`upload`) and delete the local copy. On an exception nothing is uploaded.

    Raises:
        FileExistsError: ``url`` exists and ``overwrite`` is False (checked before anything is written).
    """
    refuse_existing(url, overwrite)
    base = cache_dir() / "staging"
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"pid{os.getpid()}-", dir=base))
    try:
        local = folder / url.rstrip("/").rsplit("/", 1)[-1]
        yield local
        if not os.path.lexists(local):
            raise FileNotFoundError(f"nothing was written for '{url}'")
        upload(local, url, replace=overwrite)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def output_file(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary local file for ``target``: renamed over a local ``target`` atomically, or uploaded to a URL."""
    if is_url(target):
        with staged(str(target)) as local:
            yield local
        return
    with atomic_file(target) as tmp:
        yield tmp


__all__ = [
    "ENTRY_POINTS",
    "PreconditionFailed",
    "basename",
    "cache_dir",
    "download_tree",
    "exists",
    "fetch",
    "filesystem",
    "is_url",
    "glob",
    "join",
    "local_path",
    "output_file",
    "put_conditional",
    "read_versioned",
    "refuse_existing",
    "remove",
    "staged",
    "upload",
]


# -- conditional writes (the commit protocol of a continual state on object storage) ---------------------------------


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (create-only) or changed since it was read (compare-and-swap)."""


def _s3(url: str) -> tuple[Any, str, str]:
    fs, path = filesystem(url)
    if not hasattr(fs, "call_s3"):
        protocol = url.split("://", 1)[0]
        raise ValueError(
            f"'{url}': a continual state on object storage needs conditional writes (create-only and "
            f"compare-and-swap of its CURRENT pointer), which lightning-merge implements for s3:// (S3 and "
            f"S3-compatible stores); {protocol}:// is not supported: keep the state on a local or network "
            "filesystem"
        )
    bucket, _, key = path.partition("/")
    return fs, bucket, key


def read_versioned(url: str) -> tuple[bytes, str] | None:
    """``(content, ETag)`` of an object, or None when it does not exist (read from the store, never a cache)."""
    fs, bucket, key = _s3(url)
    try:
        reply = fs.call_s3("get_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    return _read_body(fs, reply["Body"]), str(reply["ETag"])


def _read_body(fs: Any, body: Any) -> bytes:
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read)


def put_conditional(url: str, data: bytes, *, if_match: str | None = None) -> str:
    """Write an object only if it does not exist (``if_match=None``) or still has ETag ``if_match``; returns the new
    ETag.

    Raises:
        PreconditionFailed: the condition did not hold (someone else wrote first); nothing was written.
    """
    fs, bucket, key = _s3(url)
    condition = {"IfMatch": if_match} if if_match is not None else {"IfNoneMatch": "*"}
    try:
        reply = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except (FileExistsError, OSError) as err:
        text = str(err)
        if isinstance(err, FileExistsError) or "pre-condition" in text or "PreconditionFailed" in text or \
                "ConditionalRequestConflict" in text:
            raise PreconditionFailed(url) from None
        raise
    _fresh(fs, bucket + "/" + key)
    return str(reply["ETag"])


def download_tree(url: str, local: Path) -> None:
    """Copy the remote folder ``url`` to ``local`` (replaced as a whole, atomically: never half a copy)."""
    from lightning_merge.io import partial_path, replace_dir

    fs, path = filesystem(url)
    _fresh(fs, path)
    tmp = partial_path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        prefix = path.rstrip("/") + "/"
        for remote in fs.find(path):
            rel = remote[len(prefix):]
            if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(tmp / rel))
        tmp.mkdir(exist_ok=True)
        replace_dir(tmp, local)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
