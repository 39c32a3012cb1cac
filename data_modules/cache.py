"""Decoded-image cache: every PNG of a split decoded once into one uint8 memmap, sliced per tile.

Layout under the cache root (`data.cache_dir`, default `$HYBRIDAD_CACHE_DIR`, `$XDG_CACHE_HOME/hybridad` or
`~/.cache/hybridad`):

    <cache root>/<category>-<hash of the category folder's absolute path>/
        source.txt           the category folder it was built from (informative: never used to delete)
        <split>.npy          (N,H,W,C) uint8, C = 1 for gray categories, 3 for RGB; opened with mmap
        <split>.json         index: shape and (name, size, mtime_ns) of every source PNG; written last;
                             its modification time is refreshed at every use (what `prune` reads)
        <split>.lock         build lock (fcntl): DDP ranks and workers that start at once build it once

The index is the commit marker: it is removed before a rebuild and written (atomically) only after the array
has been renamed to its final name, so a killed build leaves at most a `<split>.npy.tmp-<host>-<pid>` file.
The cache is valid while the split's file list, sizes and modification times match the index.

A build never deletes another entry, nor a temporary file it cannot prove dead (only this host's, of a
process that no longer exists): with a cache folder shared between nodes, a source folder missing here
(data staged to another node's /tmp) or a lock the file system does not honour (NFS, Lustre) must not cost
another job its cache. Old entries go only when asked: `hybridad cache prune --older-than DAYS`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_modules.listing import decode_image, image_header
from hybridad.errors import UserError
from hybridad.run_dir import atomic_write_bytes
from hybridad.types import Sample

CACHE_VERSION = 1


def default_cache_root() -> Path:
    """`$HYBRIDAD_CACHE_DIR`, else `$XDG_CACHE_HOME/hybridad`, else `~/.cache/hybridad`."""
    if os.environ.get("HYBRIDAD_CACHE_DIR"):
        return Path(os.environ["HYBRIDAD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hybridad"


def _fs_error(err: OSError, path: Path) -> UserError:
    reason = {errno.ENOSPC: "no space left", errno.EACCES: "permission denied", errno.EROFS: "read-only"}.get(
        err.errno or 0, err.strerror or str(err)
    )
    return UserError(
        f"cannot write the decoded-image cache at {path} ({reason}): set data.cache_dir to a writable folder "
        "with space, or data.cache=false"
    )


def _acquire_lock(path: Path) -> int:
    """Block until this process holds an exclusive fcntl lock on `path` (created if missing); its fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _release_lock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _file_list(samples: list[Sample]) -> list[list]:
    """[name, size, mtime_ns] of every source image, the cache's validity key."""
    out = []
    for s in samples:
        try:
            st = s.image_path.stat()
        except OSError as err:
            raise UserError(f"cannot read image {s.image_path} ({err.strerror})") from None
        out.append([s.image_path.name, st.st_size, st.st_mtime_ns])
    return out


def _tmp_name(data: Path) -> Path:
    """This process's temporary build file: host and pid in the name, so a later build can tell if it is dead."""
    host = socket.gethostname().replace("-", "_") or "host"
    return data.with_name(f"{data.name}.tmp-{host}-{os.getpid()}")


def _dead_local_tmp(path: Path) -> bool:
    """Whether `path` is a temporary build file of a process of this host that no longer runs."""
    try:
        host, pid = path.name.rsplit(".tmp-", 1)[1].rsplit("-", 1)
        pid_value = int(pid)
    except (IndexError, ValueError):
        return False  # an older or foreign name: leave it to `hybridad cache prune`
    if host != (socket.gethostname().replace("-", "_") or "host"):
        return False
    try:
        os.kill(pid_value, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, under another user
    return False


def _entry_last_use(entry: Path) -> float:
    """The newest modification time of an entry's files (an index is touched at every use)."""
    times = [p.stat().st_mtime for p in entry.iterdir() if p.is_file()]
    return max(times, default=entry.stat().st_mtime)


def _entry_in_use(entry: Path) -> bool:
    """Whether a process holds one of the entry's build locks now (it is being built)."""
    for lock in entry.glob("*.lock"):
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            continue
        finally:
            os.close(fd)
    return False


def prune_cache(cache_root: str | Path, older_than_days: float, dry_run: bool = False) -> list[Path]:
    """Delete cache entries (and stray temporary files) unused for more than `older_than_days` days.

    An entry counts as used when it was built or opened (each open refreshes its index's time). Entries being
    built (lock held) are kept. Returns what was (or, with `dry_run`, would be) deleted.

    Raises:
        UserError: a negative or non-finite age, or a cache root that is not a folder.
    """
    if not (older_than_days >= 0 and older_than_days != float("inf")):
        raise UserError(f"cache prune: --older-than {older_than_days}: give a number of days >= 0")
    root = Path(cache_root).expanduser()
    if not root.exists():
        return []
    if not root.is_dir():
        raise UserError(f"cache prune: {root} is not a folder")
    limit = time.time() - older_than_days * 86400
    removed = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        try:
            if _entry_last_use(entry) >= limit or _entry_in_use(entry):
                stale = [p for p in entry.glob("*.tmp-*") if p.stat().st_mtime < limit]
                for tmp in stale:
                    if not dry_run:
                        tmp.unlink(missing_ok=True)
                removed += stale
                continue
        except OSError:
            continue
        if not dry_run:
            shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _mark_used(index: Path) -> None:
    """Refresh the index's time (what `prune_cache` reads); a read-only cache folder is fine."""
    try:
        os.utime(index)
    except OSError:
        pass


class DecodedCache:
    """One split's images decoded once into `<split>.npy`, read back as a read-only memmap.

    Use `DecodedCache.open_or_build(...)`. The memmap is opened lazily in each process (DataLoader workers
    re-open it after fork/spawn instead of pickling the array).

    Attributes:
        path: the `.npy` file.
        shape: (N,H,W,C) uint8.
        built_seconds: time spent building in this call (0 when an existing cache was reused).
    """

    def __init__(self, path: Path, shape: tuple[int, int, int, int], built_seconds: float = 0.0) -> None:
        self.path = path
        self.shape = shape
        self.built_seconds = built_seconds
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.ndarray:
        """(N,H,W,C) uint8 read-only memmap."""
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def image(self, index: int) -> np.ndarray:
        """(H,W,3) uint8 RGB copy of one decoded image (gray expanded to 3 channels)."""
        return self.crop(index, (0, 0, self.shape[1], self.shape[2]))

    def view(self, index: int, box: tuple[int, int, int, int], rgb: bool = True) -> np.ndarray:
        """Like `crop`, but a read-only memmap view (no copy) unless gray is expanded to RGB."""
        y0, x0, y1, x1 = box
        view = self.array[index, y0:y1, x0:x1]  # (th,tw,C) memmap view
        return np.repeat(view, 3, axis=2) if view.shape[2] == 1 and rgb else view

    def crop(self, index: int, box: tuple[int, int, int, int], rgb: bool = True) -> np.ndarray:
        """(y1-y0, x1-x0, C) uint8 copy of box (y0, x0, y1, x1) of image `index`; reads only that box.

        C = 3 (gray expanded) when `rgb`, else the stored channels (1 for gray categories).
        """
        y0, x0, y1, x1 = box
        view = self.array[index, y0:y1, x0:x1]  # (th,tw,C) memmap view
        if view.shape[2] == 1 and rgb:
            return np.repeat(view, 3, axis=2)  # (th,tw,1) -> (th,tw,3), a copy
        return np.array(view)  # (th,tw,3) copy out of the page cache

    @classmethod
    def open_or_build(
        cls, cache_root: str | Path, root: str | Path, category: str, split: str, samples: list[Sample],
        progress: bool = True, threads: int | None = None,
    ) -> DecodedCache:  # fmt: skip
        """The valid cache of `samples`, building it first (under a lock) when missing or stale.

        Raises:
            UserError: an image that does not decode or differs in size (naming the file), or a cache folder
                that cannot be written (naming it).
        """
        cat_dir = (Path(root) / category).resolve()
        key = hashlib.sha1(str(cat_dir).encode()).hexdigest()[:12]
        cache_root = Path(cache_root).expanduser()
        entry = cache_root / f"{category}-{key}"
        data, index = entry / f"{split}.npy", entry / f"{split}.json"
        files = _file_list(samples)
        shape = cls._valid_shape(data, index, files)
        if shape is not None:
            _mark_used(index)
            return cls(data, shape)  # valid: nothing else is written (a read-only, pre-built cache works)
        try:
            entry.mkdir(parents=True, exist_ok=True)
            lock = _acquire_lock(entry / f"{split}.lock")
        except OSError as err:
            raise _fs_error(err, entry) from None
        try:
            shape = cls._valid_shape(data, index, files)  # another rank may have built it meanwhile
            if shape is not None:
                return cls(data, shape)
            try:
                (entry / "source.txt").write_text(str(cat_dir) + "\n")
            except OSError as err:
                raise _fs_error(err, entry) from None
            t0 = time.perf_counter()
            shape = cls._build(data, index, files, samples, f"{category}/{split}", progress, threads)
            cache = cls(data, shape, time.perf_counter() - t0)
        finally:
            _release_lock(lock)
        if progress:
            print(f"decoded-image cache {data}: {shape[0]} images, {cache.nbytes / 2**30:.2f} GiB, built in "
                  f"{cache.built_seconds:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
        return cache

    @staticmethod
    def _valid_shape(data: Path, index: Path, files: list[list]) -> tuple[int, int, int, int] | None:
        try:
            meta = json.loads(index.read_text())
            if meta.get("version") != CACHE_VERSION or meta.get("files") != files:
                return None
            shape = tuple(int(v) for v in meta["shape"])
            if data.stat().st_size < int(np.prod(shape)):
                return None
            return shape  # type: ignore[return-value]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _build(
        data: Path, index: Path, files: list[list], samples: list[Sample], desc: str, progress: bool,
        threads: int | None,
    ) -> tuple[int, int, int, int]:  # fmt: skip
        """Decode every sample into a temporary .npy, rename it, write the index. Caller holds the lock."""
        index.unlink(missing_ok=True)  # invalid from here until the new index lands
        for stale in data.parent.glob(f"{data.name}.tmp-*"):
            if _dead_local_tmp(stale):  # a killed build of this host; anything else may be a live writer
                stale.unlink(missing_ok=True)
        h, w, _ = image_header(samples[0].image_path)
        channels = 1
        for s in samples:  # headers only: sizes must agree, any RGB image makes the cache RGB
            sh, sw, sc = image_header(s.image_path)
            if (sh, sw) != (h, w):
                raise UserError(
                    f"image {s.image_path} is {sw}x{sh} but {samples[0].image_path} is {w}x{h}; all images "
                    "of a category must have one size (re-extract or remove the odd file)"
                )
            channels = max(channels, 1 if sc in (1, 2) else 3)
        shape = (len(samples), h, w, channels)
        need = int(np.prod(shape))
        free = shutil.disk_usage(data.parent).free
        if free < need:
            raise UserError(
                f"the decoded-image cache needs {need / 2**30:.1f} GiB at {data.parent} but "
                f"{free / 2**30:.1f} GiB are free: set data.cache_dir to a roomier folder or data.cache=false"
            )
        tmp = _tmp_name(data)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            fd = os.open(tmp, os.O_RDWR)
            try:  # allocate every block now: a full disk is an OSError here, not a SIGBUS while writing
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)

            def fill(i: int) -> None:
                img = decode_image(samples[i].image_path)  # (H,W,1|3)
                if img.shape[2] != channels:  # gray into an RGB cache, or gray+alpha decoded as RGB
                    img = img[:, :, :1] if channels == 1 else np.repeat(img, 3, axis=2)
                out[i] = img

            with ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 1)) as pool:
                jobs = pool.map(fill, range(len(samples)))
                bar = tqdm(jobs, total=len(samples), desc=f"cache {desc}", disable=not progress, leave=False)
                for _ in bar:
                    pass
            out.flush()
            del out
            os.replace(tmp, data)
            meta = {"version": CACHE_VERSION, "shape": list(shape), "files": files}
            atomic_write_bytes(index, json.dumps(meta).encode())
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise _fs_error(err, data.parent) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return shape
