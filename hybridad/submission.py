"""The official MVTec AD 2 submission tree: write it from run directories, check it, pack it.

```
<submission>/anomaly_images/<category>/test_private/NNN_regular.tiff                 float16, 2-D
<submission>/anomaly_images/<category>/test_private_mixed/NNN_mixed.tiff             float16, 2-D
<submission>/anomaly_images_thresholded/<category>/test_private/NNN_regular.png      {0,255}, 2-D (optional)
<submission>/anomaly_images_thresholded/<category>/test_private_mixed/NNN_mixed.png  {0,255}, 2-D (optional)
```
`check_submission` applies every rule of MVTec's checker (`check_and_prepare_data_for_upload.py`): exactly the
8 categories, exactly the two private split folders, exactly `NNN_<tag>` for NNN in 000..count-1, nothing else
at any level, TIFFs 2-D float16, PNGs 2-D with values in {0,255}. It also reports two things MVTec's checker
does not look at but the server's metrics would choke on: NaN in a map, and a mask whose size differs from its
map.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

from data_modules.listing import imread
from hybridad.errors import UserError
from hybridad.run_dir import (RunDir, atomic_write_bytes, atomic_write_with, encode_mask_png, encode_tiff,
                              to_float16_map)
from hybridad.types import CATEGORIES, PRIVATE_SPLITS

# files per private split (test_private and test_private_mixed alike), as in MVTec's checker
OFFICIAL_COUNTS: dict[str, int] = {
    "can": 321,
    "fabric": 314,
    "fruit_jelly": 255,
    "rice": 277,
    "sheet_metal": 142,
    "vial": 276,
    "wallplugs": 232,
    "walnuts": 228,
}
SPLIT_TAGS: dict[str, str] = {"test_private": "regular", "test_private_mixed": "mixed"}
MAPS_DIR = "anomaly_images"
MASKS_DIR = "anomaly_images_thresholded"
_MAX_LISTED = 10  # missing files listed one by one per folder before a summary line


# writing --------------------------------------------------------------------------------------------
def provenance_path(out: Path) -> Path:
    """Where `write_submission` records its sources: beside the tree (the checker allows nothing extra)."""
    out = Path(out)
    return out.parent / f"{out.name}.provenance.yaml"


def _resolve_source(path: Path) -> tuple[RunDir, RunDir | None]:
    """(run, evaluation or None) for a run directory or an evaluation directory `<run>/evaluations/<id>`."""
    from hybridad.evaluate import EVALUATION_FILE

    path = Path(path)
    if (path / EVALUATION_FILE).is_file():
        return RunDir(path.parent.parent), RunDir(path)
    if path.parent.name == "evaluations" and path.name.isdigit():
        raise UserError(f"{path} is not a finished evaluation (no {EVALUATION_FILE}); "
                        "re-run `hybridad evaluate`")
    return RunDir(path), None


def _provenance(run: RunDir, evaluation: RunDir | None) -> dict[str, Any]:
    """What the submission records about one category's source."""
    import yaml

    if evaluation is None:
        thresholds, metrics, overrides = run.read_thresholds(), run.read_metrics(), []
        record: dict[str, Any] = {"run": str(run.path.resolve()), "evaluation": None,
                                  "masks": "written by training"}
    else:
        from hybridad.evaluate import EVALUATION_FILE

        thresholds, metrics = evaluation.read_thresholds(), evaluation.read_metrics()
        record_file = yaml.safe_load((evaluation.path / EVALUATION_FILE).read_text()) or {}
        overrides = record_file.get("overrides", [])
        record = {"run": str(run.path.resolve()), "evaluation": str(evaluation.path.resolve()),
                  "masks": "written by `hybridad evaluate`"}
    splits = thresholds.get("splits") or {}
    record.update({
        "overrides": list(overrides),
        "tuned_on_test": bool(thresholds.get("tuned_on_test") or metrics.get("tuned_on_test")),
        "threshold_source": thresholds.get("source") or metrics.get("threshold_source"),
        "thresholds": {s.value: (splits.get(s.value) or {}).get("value", thresholds.get("value"))
                       for s in PRIVATE_SPLITS},
        "test_public": {k.split("/", 1)[1]: v for k, v in metrics.items()
                        if k.startswith("test_public/") and isinstance(v, (int, float))},
    })
    return record


def write_submission(sources: list[Path], out: Path, overwrite: bool = False) -> Path:
    """Write the tree from one run or evaluation directory per category; returns the provenance file.

    A run directory contributes its cached private maps and the masks training wrote; an evaluation
    directory (`<run>/evaluations/<id>`, made by `hybridad evaluate --write-masks`) contributes its run's maps
    and its own masks. Maps are re-encoded as 2-D float16 TIFFs and masks as {0,255} PNGs at their stored
    (native) size. The tree is built in `<out>.tmp-XXXX` beside `out` and renamed at the end, so a
    half-written tree never looks complete. Which run and evaluation each category came from, its thresholds
    and whether they were tuned on test go to `<out>.provenance.yaml` beside the tree (the checker allows
    no extra file), written before the tree is renamed into place: a kill never leaves a tree without it.

    Raises:
        UserError: `out` is non-empty (and not `overwrite`), `overwrite` of a folder that is not a submission
            tree or that holds a source, a run is incomplete, two sources share a category, a run lacks any
            map of a private split (a gap in 000..n-1, n from the dataset when it is here), a source has masks
            for only some maps, an evaluation lacks masks, or a map/mask cannot be converted.
    """
    import yaml

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; remove it or pass --overwrite")
    for source in sources:
        a, b = Path(source).resolve(), out.resolve()
        if a == b or b in a.parents:
            raise UserError(f"--out {out} holds the source {source}; write the submission elsewhere")
    if out.is_dir() and overwrite:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (MAPS_DIR, MASKS_DIR))
        if foreign:
            raise UserError(f"--overwrite replaces only a submission tree, but {out} also holds "
                            f"{', '.join(foreign[:3])}; choose another --out")

    jobs: list[tuple[Path, str]] = []  # (source file in a run, path relative to the submission root)
    seen: dict[str, Path] = {}
    provenance: dict[str, Any] = {}
    for source in sources:
        run, evaluation = _resolve_source(source)
        run.require_completed("submission write")
        category = run.category
        data = run.read_config().get("data") or {}
        if category not in CATEGORIES or data.get("format", "mvtec_ad2") != "mvtec_ad2":
            layout = data.get("format", "mvtec_ad2")
            raise UserError(f"submission is for MVTec AD 2's eight categories only: run {run.path} is "
                            f"'{category}' ({layout} layout); use evaluate, report, predict or export")
        if category in seen:
            raise UserError(f"{seen[category]} and {source} are both '{category}'; "
                            "pass one run or evaluation per category")
        seen[category] = Path(source)
        for split in PRIVATE_SPLITS:
            maps = list(run.iter_maps(split))
            if not maps:
                raise UserError(
                    f"run {run.path} has no maps for split {split.value} "
                    f"({run.path / 'maps' / split.value}/*.tiff); predict the private splits first "
                    "(predict_private=true)"
                )
            _require_complete_maps(run, category, split.value, [sid for sid, _ in maps])
            jobs += [(p, f"{MAPS_DIR}/{category}/{sid}.tiff") for sid, p in maps]
            masks = list((evaluation or run).iter_masks(split))
            if masks and [sid for sid, _ in masks] != [sid for sid, _ in maps]:
                missing = sorted({sid for sid, _ in maps} - {sid for sid, _ in masks})
                raise UserError(f"{(evaluation or run).path} has {len(masks)} {split.value} masks for "
                                f"{len(maps)} maps (missing e.g. {(missing or ['?'])[0]}); write them all: "
                                f"`hybridad evaluate {run.path} <its overrides> --write-masks`")
            if evaluation is not None and not masks:
                raise UserError(f"evaluation {evaluation.path} has no {split.value} masks; make one with masks: "
                                f"`hybridad evaluate {run.path} <its overrides> --write-masks`")
            if not masks:
                print(f"warning: run {run.path} has no masks for {split.value}; "
                      f"{MASKS_DIR}/{category}/{split.value} will be missing", file=sys.stderr)
            jobs += [(p, f"{MASKS_DIR}/{category}/{sid}.png") for sid, p in masks]
        provenance[category] = _provenance(run, evaluation)

    from hybridad.thresholds import TUNED_ON_TEST

    tuned = sorted(c for c, p in provenance.items() if p["tuned_on_test"])
    record = {"submission": str(out.resolve()), "label": TUNED_ON_TEST if tuned else None,
              "tuned_on_test": tuned, "categories": provenance}
    path = provenance_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_bytes() if path.is_file() else None
    moved = False
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        def write_one(job: tuple[Path, str]) -> None:
            src, rel = job
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(_reencode_map(src) if rel.endswith(".tiff") else _reencode_mask(src))

        # on a few threads: TIFF/PNG decoding and zlib encoding release the GIL; one file in memory per thread.
        # The first error stops the rest (queued files are cancelled) and is raised here.
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            for _ in tqdm(pool.map(write_one, jobs), total=len(jobs), desc="writing submission", unit="file",
                          disable=None):
                pass
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        _honour_umask(tmp)
        # provenance before the tree: a kill after the rename can never leave a tree without its label
        atomic_write_bytes(path, yaml.safe_dump(record, sort_keys=False).encode("utf-8"))
        _move_into_place(tmp, out)
        moved = True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not moved and previous is not None:  # the tree did not change: neither does its provenance
            atomic_write_bytes(path, previous)
        elif not moved:
            path.unlink(missing_ok=True)
        raise
    return path


def _require_complete_maps(run: RunDir, category: str, split: str, sample_ids: list[str]) -> None:
    """`UserError` unless the split's maps are `NNN_<tag>` for every NNN in 0..n-1, n = the dataset's count.

    n is the number of images in `<data.root>/<category>/<split>` when that folder exists here, else the
    highest map number + 1 (then only gaps in the numbering are found).
    """
    tag = SPLIT_TAGS[split]
    root = (run.read_config().get("data") or {}).get("root")
    folder = Path(str(root)) / category / split if root else None
    numbers = [int(n) for n in (sid.rsplit("/", 1)[-1].split("_", 1)[0] for sid in sample_ids) if n.isdigit()]
    here = folder is not None and folder.is_dir()
    count = len(list(folder.glob("*.png"))) if here else max(numbers, default=-1) + 1  # type: ignore[union-attr]
    expected = [f"{split}/{i:03d}_{tag}" for i in range(count)]
    missing = sorted(set(expected) - set(sample_ids))
    if missing:
        raise UserError(f"run {run.path} lacks {len(missing)} of {count} {split} maps (e.g. "
                        f"{run.path / 'maps' / missing[0]}.tiff): its private maps are incomplete; train the "
                        "category again (`hybridad evaluate` re-scores maps, it cannot make them)")


def _honour_umask(folder: Path) -> None:
    """mkdtemp creates the root 0700; give it the permissions a plain mkdir would."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)


def _reencode_map(src: Path) -> bytes:
    try:
        arr = tifffile.imread(src)  # (H,W) or (1,H,W)
        return encode_tiff(to_float16_map(arr))
    except (ValueError, OSError) as err:
        raise UserError(f"{src}: cannot convert to a 2-D float16 map ({err})") from None


def _reencode_mask(src: Path) -> bytes:
    img = imread(src, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"{src}: cannot read mask PNG")
    if img.ndim == 3:
        if not (img == img[..., :1]).all():
            raise UserError(f"{src}: mask has {img.shape[2]} different channels; expected one")
        img = img[..., 0]  # (H,W,C) identical channels -> (H,W)
    return encode_mask_png(img != 0)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished tree `tmp` to `out`, replacing an existing `out` (already cleared for it)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# checking -------------------------------------------------------------------------------------------
def expected_counts(categories: list[str] | None = None, data_root: Path | None = None) -> dict[str, int]:
    """Files per private split for `categories` (default: all 8): the official counts, or `data_root`'s.

    Raises:
        UserError: an unknown category, or a `data_root` category without a test_private folder.
    """
    categories = list(categories or CATEGORIES)
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise UserError(f"unknown categories {unknown}; valid: {', '.join(CATEGORIES)}")
    if data_root is None:
        return {c: OFFICIAL_COUNTS[c] for c in categories}
    counts = {}
    for c in categories:
        folder = Path(data_root) / c / "test_private"
        if not folder.is_dir():
            raise UserError(f"--data-root: {folder} not found; pass the dataset root (<root>/<category>/...)")
        counts[c] = len(list(folder.glob("*.png")))
    return counts


def check_submission(path: Path, expected_counts: dict[str, int] | None = None) -> list[str]:
    """Every problem MVTec's checker would raise on `path` (plus NaN maps and mask/map size mismatches).

    Args:
        path: the submission root (holding `anomaly_images/`).
        expected_counts: files per private split per category; default `OFFICIAL_COUNTS`. Its keys are the
            category folders that must exist.

    Returns:
        One line per problem, each naming the offending path; empty when the tree is valid. A missing
        `anomaly_images_thresholded/` is not a problem (the server then reports SegF1 = ClassF1 = 0); a
        warning line is printed to stderr instead.
    """
    path = Path(path)
    counts = dict(OFFICIAL_COUNTS if expected_counts is None else expected_counts)
    if not path.is_dir():
        return [f"{path}: not a folder"]
    top = {MAPS_DIR} | ({MASKS_DIR} if (path / MASKS_DIR).exists() else set())
    problems = _compare(path, dirs=top, files=set())
    if not (path / MASKS_DIR).exists():
        print(f"warning: {path / MASKS_DIR} not found: without thresholded masks the server reports "
              "SegF1 = 0 and ClassF1 = 0", file=sys.stderr)

    map_shapes: dict[Path, tuple[int, ...]] = {}  # key: path relative to the tree root, without suffix
    for root_name, suffix, checker in ((MAPS_DIR, ".tiff", _check_tiff), (MASKS_DIR, ".png", _check_png)):
        root = path / root_name
        if not root.is_dir():
            continue
        problems += _compare(root, dirs=set(counts), files=set())
        files: list[Path] = []
        for category in counts:
            if not (root / category).is_dir():
                continue
            problems += _compare(root / category, dirs=set(SPLIT_TAGS), files=set())
            for split, tag in SPLIT_TAGS.items():
                folder = root / category / split
                if not folder.is_dir():
                    continue
                expected = {f"{i:03d}_{tag}{suffix}" for i in range(counts[category])}
                problems += _compare(folder, dirs=set(), files=expected)
                files += [folder / name for name in sorted(expected) if (folder / name).is_file()]
        for file, (file_problems, shape) in zip(files, _parallel(checker, files, f"checking {root_name}")):
            problems += file_problems
            key = file.relative_to(root).with_suffix("")
            if root_name == MAPS_DIR:
                map_shapes[key] = shape
            elif shape and map_shapes.get(key) and map_shapes[key] != shape:
                problems.append(f"{file}: mask size {shape} differs from its map's {map_shapes[key]}")
    return problems


def _compare(parent: Path, dirs: set[str], files: set[str]) -> list[str]:
    """Missing and superfluous entries of `parent` against the required folder and file names."""
    found_dirs = {p.name for p in parent.iterdir() if p.is_dir()}
    found_files = {p.name for p in parent.iterdir() if not p.is_dir()}
    problems = [f"{parent / n}: missing folder" for n in sorted(dirs - found_dirs)]
    problems += [f"{parent / n}: superfluous folder" for n in sorted(found_dirs - dirs)]
    problems += [f"{parent / n}: superfluous file" for n in sorted(found_files - files)]
    missing = sorted(files - found_files)
    problems += [f"{parent / n}: missing file" for n in missing[:_MAX_LISTED]]
    if len(missing) > _MAX_LISTED:
        problems.append(f"{parent}: {len(missing) - _MAX_LISTED} more missing files (up to {missing[-1]})")
    return problems


def _check_tiff(file: Path) -> tuple[list[str], tuple[int, ...]]:
    try:
        with tifffile.TiffFile(file) as tif:
            arr = tif.series[0].asarray()  # what tifffile.imread returns, as MVTec's checker reads it
    except Exception as err:  # any decode failure is a problem to report, not a crash
        return [f"{file}: cannot read TIFF ({err})"], ()
    if arr.ndim != 2:
        return [f"{file}: not a single-channel 2-D image (shape {arr.shape})"], ()
    problems = []
    if arr.dtype != np.float16:
        problems.append(f"{file}: dtype {arr.dtype}, must be float16")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        problems.append(f"{file}: contains NaN (not checked by MVTec's checker, but breaks AU-PRO)")
    return problems, tuple(arr.shape)


def _check_png(file: Path) -> tuple[list[str], tuple[int, ...]]:
    img = imread(file, cv2.IMREAD_UNCHANGED)
    if img is None:
        return [f"{file}: cannot read PNG"], ()
    if img.ndim != 2:
        return [f"{file}: not a single-channel 2-D image (shape {img.shape})"], ()
    values = np.unique(img)
    bad = values[~np.isin(values, (0, 255))]
    if bad.size:
        return [f"{file}: values {bad[:5].tolist()} not in {{0, 255}}"], tuple(img.shape)
    return [], tuple(img.shape)


def _parallel(fn: Callable[[Path], tuple[list[str], tuple[int, ...]]], files: list[Path], desc: str
              ) -> Iterable[tuple[list[str], tuple[int, ...]]]:
    """`fn` over files on a few threads (decoding releases the GIL), results in input order."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        yield from tqdm(pool.map(fn, files), total=len(files), desc=desc, unit="file", disable=None)


# packing --------------------------------------------------------------------------------------------
def pack_submission(path: Path, out: Path, expected_counts: dict[str, int] | None = None,
                    arc_root: str | None = None) -> Path:
    """Check `path`, then write it as a `.tar.gz` atomically; returns the archive path.

    Members are laid out as MVTec's `compress_submission` does: `<arc_root>/anomaly_images/...` and
    `<arc_root>/anomaly_images_thresholded/...`, where `arc_root` defaults to the submission folder's name.
    Pass `arc_root=""` to put the two folders at the archive root instead.

    Args:
        path: a submission tree that passes `check_submission`.
        out: the archive file (must end in `.tar.gz`), or an existing folder to write `<path.name>.tar.gz`
            into.
        expected_counts: forwarded to `check_submission` (tests use small counts).
        arc_root: the archive's top folder; `None` = `path.name`, `""` = none.
    """
    path, out = Path(path), Path(out)
    problems = check_submission(path, expected_counts)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserError(f"{path} fails the submission check ({len(problems)} problems): {shown}")
    if out.is_dir():
        out = out / f"{path.resolve().name}.tar.gz"
    if not out.name.endswith(".tar.gz"):
        raise UserError(f"{out}: the archive name must end in .tar.gz")
    prefix = path.resolve().name if arc_root is None else arc_root
    files = sorted(p for name in (MAPS_DIR, MASKS_DIR) if (path / name).is_dir()
                   for p in (path / name).rglob("*") if p.is_file())

    def write(raw: BinaryIO) -> None:
        with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
            for file in tqdm(files, desc="packing submission", unit="file", disable=None):
                rel = file.relative_to(path).as_posix()
                tar.add(file, arcname=f"{prefix}/{rel}" if prefix else rel, recursive=False)

    atomic_write_with(out, write)  # temporary file (0666 minus the umask), fsync, rename; removed on failure
    return out
