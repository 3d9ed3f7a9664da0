"""Object storage (``s3://``, ``gs://``, ``az://``, ... any fsspec URL) for experts, sidecars and outputs.

One mechanism, used by every path: **inputs are fetched, outputs are staged.**

- Reading: :func:`fetch` copies a remote file or folder into a local cache once (``LIGHTNING_MERGE_CACHE``, default
  ``~/.cache/lightning-merge``), keyed by URL and revalidated by each object's ETag (or size and modification time),
  so a sweep of merges over the same experts downloads each byte once. A file's sidecar
  (``X.statistics.safetensors``) comes with it. Every reader of the package then reads the local copy, so every
  format (safetensors, sharded folders, ``.ckpt``, PEFT adapters) works unchanged. A download is written under a
  temporary name and renamed, so an interrupted fetch is never mistaken for a complete copy; a folder is listed
  again after its download, and fetched again if it changed meanwhile. A folder holding
  ``lightning_merge.incomplete`` (an upload in progress or interrupted) is refused (:class:`IncompleteOutput`).
- Writing: :func:`staged` yields a local path to write the output into (with the usual atomic local write), then
  uploads it. What is at the URL follows the ownership rule (:mod:`lightning_merge.files.ownership`): only an earlier
  output of lightning-merge is replaced. A single object is atomic on object stores (a PUT, or a multipart upload,
  appears whole or not at all; a new one is created with ``If-None-Match`` on S3). A folder is written under an
  in-progress marker, entry point last, old files deleted only if its provenance lists them (see
  :func:`_upload_folder` and docs/storage.md), so it never reads as a mix of two outputs.

Credentials and endpoints come from the filesystem's usual configuration (for S3: ``AWS_*`` variables, or
``FSSPEC_S3_ENDPOINT_URL`` / ``FSSPEC_S3_KEY`` ... or an fsspec config file); the protocol's package must be
installed (``pip install s3fs`` / ``gcsfs`` / ``adlfs``). An ``s3://KEY:SECRET@bucket/...`` URL's credentials are
passed to s3fs and never shown: :func:`redact` hides them, and presigned URLs' signatures, wherever a URL is shown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_merge.errors import PreconditionFailed
from lightning_merge.files.atomic import atomic_file
from lightning_merge.files.ownership import (
    INCOMPLETE_NAME,
    PROVENANCE_NAME,
    ForeignOutput,
    IncompleteOutput,
    incomplete,
    listed_files,
    refusal,
    remote_reason,
)

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


# user information: ``user@`` or ``user:secret@`` (a secret may hold a slash), right after the scheme
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^/@\s'\"?#]*|[^/@\s'\"?#]*:[^@\s'\"]*)@")
_SECRET_PARAMS = re.compile(
    r"(?i)([?&;](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|"
    r"signature|sig|awsaccesskeyid|key-pair-id|policy|token|access_token|sas_token|password|secret)=)[^&;#\s'\"]*")


def redact(text: Any) -> str:
    """``text`` (a URL, or any message holding URLs) with the secrets a URL can carry replaced by ``***``: the
    user information of ``s3://KEY:SECRET@bucket/...`` and the signing parameters of presigned and SAS URLs
    (``X-Amz-Signature``, ``X-Amz-Credential``, ``Signature``, ``sig``, ...). Used wherever a URL is shown: errors,
    logs, provenance, expert names, and the command line's error printer."""
    return _SECRET_PARAMS.sub(r"\1***", _USERINFO.sub(r"\1***@", str(text)))


def same_location(a: str, b: str) -> str | None:
    """How URL ``a`` relates to URL ``b``: ``"is"`` (the same object or folder, whatever the trailing slashes,
    doubled slashes or credentials), ``"holds"`` (``b`` is inside ``a``), ``"is inside"``, or None."""
    na, nb = _location(a), _location(b)
    if na == nb:
        return "is"
    if nb.startswith(na + "/"):
        return "holds"
    if na.startswith(nb + "/"):
        return "is inside"
    return None


def _location(url: str) -> str:
    protocol, _, rest = str(url).partition("://")
    protocol = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "abfs": "az", "adl": "az"}.get(protocol.lower(),
                                                                                    protocol.lower())
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    host, _, path = rest.partition("/")
    host = host.rsplit("@", 1)[-1]
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return f"{protocol}://" + "/".join([host, *parts])


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it.

    Raises:
        ValueError: fsspec has no implementation for the protocol, or its package is not installed.
    """
    import fsspec
    from fsspec.core import url_to_fs

    protocol, _, rest = url.partition("://")
    options: dict[str, str] = {}
    found = _USERINFO.match(url)
    if found:  # credentials in the URL: given to the filesystem, never left in a path it may echo in an error
        from urllib.parse import unquote

        key, _, secret = rest[: found.end() - len(found.group(1)) - 1].partition(":")
        if protocol not in ("s3", "s3a", "s3n"):
            raise ValueError(f"'{redact(url)}': credentials in a {protocol}:// URL are not read; configure them as "
                             "that filesystem's documentation says (environment, config file)")
        options = {"key": unquote(key), "secret": unquote(secret)}
        url = f"{protocol}://{url[found.end():]}"
    try:
        return url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        protocol = url.split("://", 1)[0]
        package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
        hint = f"pip install {package[protocol]}" if protocol in package else "install its fsspec implementation"
        known = ", ".join(sorted(fsspec.available_protocols())[:12])
        raise ValueError(redact(f"'{url}': cannot open the {protocol}:// filesystem ({err}); {hint} (fsspec knows: "
                                f"{known} ...)")) from None


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


class _Changed(OSError):
    """An object changed between its listing and its download."""


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
            raise _Changed(f"'{redact(remote)}': downloaded {got} bytes of {info['size']} (the object changed or "
                           "the connection dropped); fetch again")
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
        IncompleteOutput: ``url`` is a folder whose upload is in progress or was interrupted (it holds
            ``lightning_merge.incomplete``), or that kept changing while it was downloaded.
    """
    fs, path = filesystem(url)
    _fresh(fs, path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"'{redact(url)}' does not exist") from None
    root = cache_dir() / hashlib.sha256(url.rstrip("/").rsplit("/", 1)[0].encode()).hexdigest()[:24]
    name = path.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]  # never a presigned query string in a local name
    local = root / name
    if info.get("type") == "directory":
        for _attempt in range(3):
            found = _listing(fs, path)
            if not found:
                raise FileNotFoundError(f"'{redact(url)}' is an empty folder")
            if INCOMPLETE_NAME in found:
                raise incomplete(redact(url))
            try:
                for rel, (remote, entry) in found.items():
                    _fetch_file(fs, remote, entry, local / rel)
            except (_Changed, FileNotFoundError):  # replaced while we read it: list and fetch again
                _fresh(fs, path)
                again = _listing(fs, path)
                continue
            for item in list(local.rglob("*")):  # files the remote folder no longer has: never read them
                if not item.is_file():
                    continue
                marker = item.name.startswith(".") and item.name.endswith(".version")
                subject = item.with_name(item.name[1:-len(".version")]) if marker else item
                if subject.relative_to(local).as_posix() not in found:
                    item.unlink()
            _fresh(fs, path)
            again = _listing(fs, path)  # a writer replacing the folder meanwhile: never keep a mix of the two
            if {r: _version(e) for r, (_, e) in again.items()} == {r: _version(e) for r, (_, e) in found.items()}:
                return local
        if INCOMPLETE_NAME in again:
            raise incomplete(redact(url))
        raise IncompleteOutput(f"'{redact(url)}' kept changing while it was downloaded (another process is writing "
                               "it); try again once it is written")
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


def _listing(fs: Any, path: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{relative name: (key, info)}`` of every object under the folder ``path``."""
    prefix = path.rstrip("/") + "/"
    out = {}
    for remote, entry in fs.find(path, detail=True).items():
        rel = remote[len(prefix):] if remote.startswith(prefix) else remote.rsplit("/", 1)[-1]
        if not rel or rel.endswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
            continue
        out[rel] = (remote, entry)
    return out


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
    """The check every output at a URL makes before anything is written (and again just before its upload).

    Raises:
        ForeignOutput: something lightning-merge did not write is at ``url`` (see
            :mod:`lightning_merge.files.ownership`), whatever ``overwrite`` says.
        FileExistsError: an earlier output is at ``url`` and ``overwrite`` is False.
    """
    fs, path = filesystem(str(url))
    _fresh(fs, path)
    if not fs.exists(path):
        return
    reason = remote_reason(fs, path)
    if reason is not None:
        raise refusal(redact(url), reason)
    if not overwrite:
        raise FileExistsError(f"output '{redact(url)}' already exists; pass overwrite=True (CLI: --overwrite) to "
                              "replace it")


def _created_meanwhile(url: str) -> FileExistsError:
    return FileExistsError(
        f"output '{redact(url)}' was created by another process while this one was writing it; it was left as it is "
        "and this result was discarded: choose another path, or pass overwrite=True (CLI: --overwrite) to replace it"
    )


def upload(local: Path, url: str, *, replace: bool = True) -> str:
    """Upload a file or folder to ``url``; a folder under the in-progress marker, its entry point last (see the
    module docs and docs/storage.md). Returns ``url``.

    Args:
        local: the finished local output.
        url: where it goes.
        replace: an existing earlier output of lightning-merge at ``url`` is replaced (its files that the new output
            does not have are deleted: only those its ``lightning_merge.json`` lists, never another object); with
            False, ``url`` must not exist, up to the commit (a conditional write on S3).

    Raises:
        ForeignOutput: something lightning-merge did not write is at ``url``.
        FileExistsError: ``replace`` is False and ``url`` exists, or was created by another process meanwhile.
    """
    refuse_existing(url, replace)
    fs, path = filesystem(url)
    _fresh(fs, path)
    if local.is_dir():
        _upload_folder(fs, path, local, url, replace)
        return url
    if replace:
        fs.put_file(str(local), path)  # one object: appears whole or not at all
    elif hasattr(fs, "call_s3"):
        try:
            fs.put_file(str(local), path, mode="create")  # If-None-Match: the no-overwrite check at the commit
        except (FileExistsError, OSError) as err:
            if isinstance(err, FileExistsError) or _precondition(err):
                raise _created_meanwhile(url) from None
            raise
    else:  # no conditional write on this store: check once more, as close to the write as possible
        _fresh(fs, path)
        if fs.exists(path):
            raise _created_meanwhile(url)
        fs.put_file(str(local), path)
    _fresh(fs, path)
    return url


def _precondition(err: BaseException) -> bool:
    text = str(err)
    return "pre-condition" in text or "PreconditionFailed" in text or "ConditionalRequestConflict" in text


def _upload_folder(fs: Any, path: str, local: Path, url: str, replace: bool) -> None:
    """The commit order of a folder at a URL (object stores have no rename):

    1. ``lightning_merge.incomplete`` is written (created only if absent, on S3), listing every file the folder may
       hold until the upload ends: the old output's listed files and the new ones. From here on no reader of
       lightning-merge accepts the folder, and a retry knows which objects it may delete.
    2. The old output's entry points (index, weights) are deleted, so no other loader accepts it either.
    3. The new files are uploaded, entry points last.
    4. The old output's listed files that the new one does not have are deleted (no other object, ever).
    5. The marker is deleted: the folder is the new output, whole.
    """
    prefix = path.rstrip("/") + "/"
    marker = prefix + INCOMPLETE_NAME
    rel = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    existing = set(_listing(fs, path)) if fs.exists(path) else set()
    ours = _listed_remote(fs, prefix, existing)
    token = uuid.uuid4().hex
    record = json.dumps({"writer": token, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                         "files": sorted(ours | set(rel))}).encode()
    _take_marker(fs, marker, record, url, replace)
    touched = False
    try:
        if not replace and set(_listing(fs, path)) - {INCOMPLETE_NAME}:
            raise _created_meanwhile(url)  # another writer's finished output: ours never touches it
        for entry in ENTRY_POINTS:
            if entry in existing:
                touched = True
                fs.rm_file(prefix + entry)  # from here on no loader accepts the old output
        last = [r for r in ENTRY_POINTS if r in rel]
        for r in [r for r in rel if r not in last] + last:
            touched = True
            fs.put_file(str(local / r), prefix + r)
        for r in sorted((ours & existing) - set(rel) - {INCOMPLETE_NAME}):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(prefix + r)
    except BaseException:
        if not touched:
            _release_marker(fs, marker, token)
        raise  # otherwise the marker stays: the folder is visibly incomplete until a retry replaces it
    _release_marker(fs, marker, token)
    _fresh(fs, path)


def _listed_remote(fs: Any, prefix: str, existing: set[str]) -> set[str]:
    """The objects of the folder an earlier output (or an interrupted upload) of lightning-merge says it wrote."""
    ours: set[str] = set()
    for name in (PROVENANCE_NAME, INCOMPLETE_NAME):
        if name in existing:
            ours.add(name)
            try:
                ours |= listed_files(json.loads(fs.cat_file(prefix + name))) or set()
            except (ValueError, UnicodeDecodeError):
                pass
    return ours


def _take_marker(fs: Any, marker: str, record: bytes, url: str, replace: bool) -> None:
    """Write the in-progress marker: created only if absent where the store has conditional writes (S3), so two
    writers never upload into one folder at once unnoticed; an interrupted upload's marker is taken over only with
    ``replace``."""
    if not hasattr(fs, "call_s3"):
        fs.pipe_file(marker, record)
        return
    bucket, _, key = marker.partition("/")
    try:
        _put_if(fs, bucket, key, record, None)
        return
    except PreconditionFailed:
        if not replace:
            raise _created_meanwhile(url) from None
    current = _get_versioned(fs, bucket, key)
    try:
        _put_if(fs, bucket, key, record, None if current is None else current[1])  # take over an interrupted upload
    except PreconditionFailed:
        raise FileExistsError(f"output '{redact(url)}' is being written by another process right now; try again "
                              "when it has finished") from None


def _release_marker(fs: Any, marker: str, token: str) -> None:
    """Delete the marker if it is still this writer's (another writer that took it over deletes it itself)."""
    with contextlib.suppress(FileNotFoundError):
        content = fs.cat_file(marker)
        try:
            mine = json.loads(content).get("writer") == token
        except (ValueError, AttributeError):
            mine = False
        if mine:
            fs.rm_file(marker)


@contextlib.contextmanager
def staged(url: str, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a local path named like ``url``'s last component to write an output into; on success upload it to
    ``url`` (see :func:`upload`) and delete the local copy. On an exception nothing is uploaded.

    Args:
        url: the output.
        overwrite: an earlier output of lightning-merge at ``url`` may be replaced.

    Raises:
        ForeignOutput: something lightning-merge did not write is at ``url``.
        FileExistsError: ``url`` exists and ``overwrite`` is False (checked before anything is written, and again
            at the upload).
    """
    refuse_existing(url, overwrite)
    base = cache_dir() / "staging"
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"pid{os.getpid()}-", dir=base))
    try:
        local = folder / url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
        yield local
        if not os.path.lexists(local):
            raise FileNotFoundError(f"nothing was written for '{redact(url)}'")
        try:
            upload(local, url, replace=overwrite)
        except ForeignOutput:
            raise
        except FileExistsError:
            if overwrite:
                raise
            raise _created_meanwhile(url) from None  # it was checked absent before the output was written
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def output_file(target: str | os.PathLike, *, replace: str = "always") -> Iterator[Path]:
    """A temporary local file for ``target``: moved to a local ``target`` atomically, or uploaded to a URL.

    Args:
        target: the file.
        replace: what may be at ``target`` (see :func:`lightning_merge.files.atomic.commit`): ``"own"`` for an output of
            lightning-merge that may replace an earlier one, ``"never"`` for a new output, ``"always"`` for anything
            (a URL is then overwritten without the ownership check).
    """
    if is_url(target):
        if replace == "always":
            with _staged_plain(str(target)) as local:
                yield local
            return
        with staged(str(target), overwrite=replace == "own") as local:
            yield local
        return
    with atomic_file(target, replace=replace) as tmp:
        yield tmp


@contextlib.contextmanager
def _staged_plain(url: str) -> Iterator[Path]:
    """:func:`staged` for one object written unconditionally (a user's own file through ``save_tensors``)."""
    base = cache_dir() / "staging"
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"pid{os.getpid()}-", dir=base))
    try:
        local = folder / url.rstrip("/").rsplit("/", 1)[-1]
        yield local
        fs, path = filesystem(url)
        fs.put_file(str(local), path)
        _fresh(fs, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
    "redact",
    "refuse_existing",
    "remove",
    "same_location",
    "staged",
    "upload",
]


# -- conditional writes (the commit protocol of a continual state on object storage) ---------------------------------



def _s3(url: str) -> tuple[Any, str, str]:
    fs, path = filesystem(url)
    if not hasattr(fs, "call_s3"):
        protocol = url.split("://", 1)[0]
        raise ValueError(
            f"'{redact(url)}': a continual state on object storage needs conditional writes (create-only and "
            f"compare-and-swap of its CURRENT pointer), which lightning-merge implements for s3:// (S3 and "
            f"S3-compatible stores); {protocol}:// is not supported: keep the state on a local or network "
            "filesystem"
        )
    bucket, _, key = path.partition("/")
    return fs, bucket, key


def read_versioned(url: str) -> tuple[bytes, str] | None:
    """``(content, ETag)`` of an object, or None when it does not exist (read from the store, never a cache)."""
    return _get_versioned(*_s3(url))


def _get_versioned(fs: Any, bucket: str, key: str) -> tuple[bytes, str] | None:
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
    return _put_if(*_s3(url), data, if_match)


def _put_if(fs: Any, bucket: str, key: str, data: bytes, if_match: str | None) -> str:
    condition = {"IfMatch": if_match} if if_match is not None else {"IfNoneMatch": "*"}
    try:
        reply = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except (FileExistsError, OSError) as err:
        if isinstance(err, FileExistsError) or _precondition(err):
            raise PreconditionFailed(f"{bucket}/{key}") from None
        raise
    _fresh(fs, bucket + "/" + key)
    return str(reply["ETag"])


def download_tree(url: str, local: Path) -> None:
    """Copy the remote folder ``url`` to ``local`` (replaced as a whole, atomically: never half a copy)."""
    from lightning_merge.files.atomic import partial_path, replace_dir

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
