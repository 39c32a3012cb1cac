"""The run directory: the on-disk contract between training and everything after it.

```
<run>/config.yaml                  resolved config (written by `hybridad train`)
<run>/validation_images.txt        images carved out of train as validation (layouts without a validation split)
<run>/state.json                   {"state": "running"|"completed"|"failed", "reason": str|null, "updated": iso time}
<run>/thresholds.yaml              {value, method, source, tuned_on_test, stats: {...}}
<run>/metrics.json                 flat {"test_public/aupro_0.05": 0.61, ..., "threshold_source": "..."}
<run>/maps/<sample_id>.tiff        float16 (H,W) anomaly map at native resolution
<run>/masks/<sample_id>.png        uint8 (H,W) binary mask, values {0,255}
<run>/checkpoints/last.ckpt        resumable checkpoint (model, optimiser, loops, data position, random states)
<run>/checkpoints/final.ckpt       weights only (model + threshold)
<run>/.lock                        flock held by the process that runs it (hybridad.run_claim)
<run>/overlays/                    PNG overlays
```
`sample_id` is `Sample.sample_id`: `test_public/bad/000_regular`, `validation/good/003_regular`,
`test_private/000_regular`; other layouts nest the defect type: `test_public/bad/scratch/000`. Since the
split is its first component, the map of a sample lives at
`maps/<split>/<good|bad>/<stem>.tiff` (labelled splits) or `maps/<split>/<stem>.tiff` (private splits).

Every file is written to a hidden temporary name in its final folder and renamed with `os.replace`, so a
reader never sees a half-written file under its final name; files get 0666 minus the umask, as `open` gives.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import cv2
import numpy as np
import tifffile
import yaml

from data_modules.listing import imread
from hybridad.errors import UserError, first_line
from hybridad.types import PRIVATE_SPLITS, Split

if TYPE_CHECKING:
    from torch import Tensor

RUN_STATES = ("running", "completed", "failed")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_SPLITS = {s.value for s in Split}
_PRIVATE = {s.value for s in PRIVATE_SPLITS}


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (else set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _DeferredWriteError(io.RawIOBase):
    """A binary file that keeps its first write error and lets the caller raise it after the writer returns.

    torch's C++ zip writer (`torch.save`, `torch.export.save` to a file object) cannot survive an exception
    raised by `write`: its destructor writes the end of the archive again and `std::terminate` aborts the
    process (exit code 134) on a full disk. Swallowed here, the writer finishes and the error is raised after.
    """

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:  # type: ignore[override]
        if self.error is None:
            try:
                return self._f.write(data)
            except OSError as err:
                self.error = err
        return memoryview(data).nbytes

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def atomic_write_with(path: Path, write: Callable[[BinaryIO], None], defer_write_errors: bool = False) -> None:
    """Call `write(f)` on a temporary file in `path`'s folder, fsync it and `os.replace` it onto `path`.

    The file gets the permissions a plain `open(path, "w")` would (0666 minus the umask), not mkstemp's 0600.
    On any failure the temporary file is removed and an existing `path` keeps its old content; an `OSError`
    (a full disk, a read-only or unwritable folder) is re-raised naming `path`. `defer_write_errors`: for
    writers in C++ (`torch.save`, `torch.export.save`) that abort the process when `write` raises; the first
    write error is raised once `write(f)` has returned.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if defer_write_errors:
                deferred = _DeferredWriteError(f)
                write(deferred)  # type: ignore[arg-type]
                if deferred.error is not None:
                    raise deferred.error
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and getattr(err, "filename", None) is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write_with`)."""
    atomic_write_with(path, lambda f: f.write(data))


def split_of(sample_id: str) -> str:
    """The split folder name that starts a sample id; `ValueError` for a malformed id."""
    parts = sample_id.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] not in _SPLITS:
        raise ValueError(f"malformed sample id '{sample_id}' (expected '<split>/[good|bad/]<stem>')")
    private = parts[0] in _PRIVATE  # labelled ids may nest the defect type: test_public/bad/<type>/<stem>
    if (len(parts) != 2) if private else (len(parts) < 3 or parts[1] not in ("good", "bad")):
        raise ValueError(f"malformed sample id '{sample_id}' for split '{parts[0]}'")
    return parts[0]


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor on any device; bfloat16/half are widened to float32
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def to_float16_map(anomaly_map: Tensor | np.ndarray) -> np.ndarray:
    """(H,W) or (1,H,W) scores -> (H,W) float16, clipped to +-65504 so no value becomes inf.

    NaN raises `ValueError`: a NaN map is a bug upstream and would silently break every metric.
    """
    arr = _to_numpy(anomaly_map)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]  # (1,H,W) -> (H,W)
    if arr.ndim != 2:
        raise ValueError(f"anomaly map must be (H,W) or (1,H,W), got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if np.isnan(arr).any():
        raise ValueError("anomaly map contains NaN")
    return np.clip(arr, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


def encode_tiff(map16: np.ndarray, zlib_level: int = 1) -> bytes:
    """An (H,W) float16 array as single-page TIFF bytes, deflate (zlib) compressed; level 0: uncompressed.

    Lossless, and read back exactly by `tifffile.imread` (what MVTec's checker and AU-PRO code use) through
    Python's own zlib, no imagecodecs needed. A 2448x2048 map (10 MB raw) shrinks 1.3-3x depending on its
    smoothness; higher levels gain almost nothing for 2x the write time (`python -m bench.bench_disk`).
    """
    buf = io.BytesIO()
    if zlib_level > 0:
        tifffile.imwrite(buf, map16, compression="zlib", compressionargs={"level": zlib_level})
    else:
        tifffile.imwrite(buf, map16)
    return buf.getvalue()


def encode_mask_png(mask: Tensor | np.ndarray) -> bytes:
    """A boolean (H,W) or (1,H,W) mask (nonzero = anomalous) as single-channel uint8 PNG bytes {0,255}."""
    arr = _to_numpy(mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]  # (1,H,W) -> (H,W)
    if arr.ndim != 2:
        raise ValueError(f"mask must be (H,W) or (1,H,W), got shape {arr.shape}")
    ok, png = cv2.imencode(".png", np.where(arr != 0, 255, 0).astype(np.uint8))
    if not ok:
        raise OSError("cv2 could not encode a PNG mask")
    return png.tobytes()


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode an (H,W) or (H,W,3) BGR uint8 image as PNG and write it atomically (unlike `cv2.imwrite`, a
    failure raises: `OSError` naming `path`)."""
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cv2 could not encode {path} as PNG (image {image.shape} {image.dtype})")
    atomic_write_bytes(path, png.tobytes())


def _plain(value: Any) -> Any:
    """numpy / torch scalars and containers -> plain Python, for YAML and JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "detach"):  # torch.Tensor
        return _plain(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


class RunDir:
    """One run directory (see the module docstring for the layout).

    Args:
        path: the run folder; created lazily by the first write.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # config -----------------------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """`config.yaml` as a plain dict; `UserError` if it is missing or unreadable."""
        path = self.path / "config.yaml"
        if not path.is_file():
            raise UserError(f"{path} not found: is {self.path} a hybridad run directory?")
        try:
            cfg = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{path}: cannot parse YAML ({str(err).splitlines()[0]})") from None
        return cfg if isinstance(cfg, dict) else {}

    @property
    def category(self) -> str:
        """`data.category` from `config.yaml`."""
        category = (self.read_config().get("data") or {}).get("category")
        if not category:
            raise UserError(f"{self.path / 'config.yaml'} has no data.category")
        return str(category)

    def write_text(self, name: str, text: str) -> Path:
        """Write `<run>/<name>` atomically (e.g. `config.yaml`)."""
        path = self.path / name
        atomic_write_bytes(path, text.encode("utf-8"))
        return path

    # lifecycle --------------------------------------------------------------------------------------------
    def write_state(self, state: str, reason: str | None = None) -> Path:
        """Record the run's state (`running`, `completed` or `failed` with a one-line reason)."""
        if state not in RUN_STATES:
            raise ValueError(f"unknown run state '{state}'; valid: {', '.join(RUN_STATES)}")
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record = {"state": state, "reason": reason, "updated": stamp}
        return self.write_text("state.json", json.dumps(record, indent=2) + "\n")

    def read_state(self) -> dict[str, Any]:
        """`state.json` as a dict; `{}` when the run has none (not made by `hybridad train`, or very old)."""
        path = self.path / "state.json"
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}

    def require_completed(self, action: str) -> None:
        """`UserError` (one line) unless the run finished: `action` says what was refused (e.g. 'evaluate')."""
        record = self.read_state()
        state = record.get("state", "unknown (no state.json)")
        if state != "completed":
            why = f": {record['reason']}" if record.get("reason") else ""
            raise UserError(f"{action}: run {self.path} is not complete (state {state}{why}); "
                            "finish or resume it first (`hybridad train resume=<run dir>`)")

    # maps and masks ---------------------------------------------------------------------------------------
    def map_path(self, sample_id: str) -> Path:
        split_of(sample_id)
        return self.path / "maps" / f"{sample_id}.tiff"

    def mask_path(self, sample_id: str) -> Path:
        split_of(sample_id)
        return self.path / "masks" / f"{sample_id}.png"

    def write_map(self, sample_id: str, anomaly_map: Tensor | np.ndarray) -> Path:
        """Save an (H,W) or (1,H,W) map as float16 TIFF (clipped to +-65504; NaN raises `ValueError`)."""
        path = self.map_path(sample_id)
        atomic_write_bytes(path, encode_tiff(to_float16_map(anomaly_map)))
        return path

    def read_map(self, sample_id: str) -> np.ndarray:
        """The (H,W) float32 map of a sample (the float16 values, exactly); `UserError` if it is corrupt."""
        path = self.map_path(sample_id)
        try:
            return tifffile.imread(path).astype(np.float32)
        except FileNotFoundError:
            raise
        except Exception as err:  # truncated or corrupt TIFF (zlib.error, tifffile's own errors, ...)
            why = first_line(err)
            raise UserError(f"cached map {path} is truncated or corrupt ({why}); restore it from a backup "
                            "or train the category again") from None

    def write_mask(self, sample_id: str, mask: Tensor | np.ndarray) -> Path:
        """Save an (H,W) boolean mask as a {0,255} single-channel PNG."""
        path = self.mask_path(sample_id)
        atomic_write_bytes(path, encode_mask_png(mask))
        return path

    def read_mask(self, sample_id: str) -> np.ndarray:
        """The (H,W) bool mask of a sample (nonzero pixels are True)."""
        path = self.mask_path(sample_id)
        img = imread(path, cv2.IMREAD_UNCHANGED)
        if img is None:
            raise FileNotFoundError(f"cannot read mask {path}")
        return img != 0

    def iter_maps(self, split: Split | str) -> Iterator[tuple[str, Path]]:
        """`(sample_id, path)` of every map of a split, sorted by sample id."""
        yield from self._iter(self.path / "maps", Split(split).value, ".tiff")

    def iter_masks(self, split: Split | str) -> Iterator[tuple[str, Path]]:
        """`(sample_id, path)` of every mask of a split, sorted by sample id."""
        yield from self._iter(self.path / "masks", Split(split).value, ".png")

    @staticmethod
    def _iter(root: Path, split: str, suffix: str) -> Iterator[tuple[str, Path]]:
        folder = root / split
        if not folder.is_dir():
            return
        found = []
        for path in folder.rglob(f"*{suffix}"):
            if path.name.startswith(".") or not path.is_file():
                continue  # temporary files of a write in progress
            found.append((path.relative_to(root).with_suffix("").as_posix(), path))
        yield from sorted(found)

    # thresholds and metrics -------------------------------------------------------------------------------
    def write_thresholds(self, thresholds: Mapping[str, Any]) -> Path:
        """Save `{value, method, source, tuned_on_test, stats: {...}}` as `thresholds.yaml` (replaces it)."""
        text = yaml.safe_dump(_plain(thresholds), sort_keys=False)
        return self.write_text("thresholds.yaml", text)

    def read_thresholds(self) -> dict[str, Any]:
        """`thresholds.yaml` as a dict; `{}` if the run has none yet."""
        path = self.path / "thresholds.yaml"
        if not path.is_file():
            return {}
        data = yaml.safe_load(path.read_text())
        return data if isinstance(data, dict) else {}

    def write_metrics(self, metrics: Mapping[str, Any]) -> Path:
        """Merge flat `split/name` metrics into `metrics.json` (new keys win)."""
        merged = self.read_metrics()
        merged.update(_plain(metrics))
        return self.write_text("metrics.json", json.dumps(merged, indent=2, sort_keys=True) + "\n")

    def read_metrics(self) -> dict[str, Any]:
        """`metrics.json` as a dict; `{}` if the run has none yet."""
        path = self.path / "metrics.json"
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        return data if isinstance(data, dict) else {}
