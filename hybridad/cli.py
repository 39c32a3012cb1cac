"""`python -m hybridad <command>`: the one entry point.

Commands import their machinery lazily, so `--help` is instant and importing this module touches nothing.
A `UserError` anywhere is printed as one line (`hybridad: error: ...`) with exit code 2, and so is a full,
unwritable or read-only disk (ENOSPC, EDQUOT, EACCES, EPERM, EROFS) or a path that cannot exist there (ENOENT,
ENOTDIR, EISDIR, ENAMETOOLONG, EEXIST), naming the path.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from hybridad.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from hybridad.config import load_config, to_yaml

    cfg = load_config(args.overrides)  # config errors surface before the heavy imports
    if args.show_config:
        print(to_yaml(cfg), end="")
        return 0
    from hybridad.train import train

    train(cfg)
    return 0


def _cmd_train_all(args: argparse.Namespace) -> int:
    from hybridad import train_all as ta

    cats = args.categories or None
    if args.summary:
        results = ta.summary_from_runs(args.overrides, cats)
    elif args.slurm_array:
        from hybridad.types import CATEGORIES

        results = ta.train_all(args.overrides, [ta.slurm_category(list(cats or CATEGORIES))])
    else:
        gpus = ta.parse_gpus(args.gpus) if args.gpus else None
        results = ta.train_all(args.overrides, cats, gpus=gpus, jobs=args.jobs)
    print(ta.summary_table(results))
    return ta.exit_code(results)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from hybridad.evaluate import create_evaluation, recreate_best

    run_dir, overrides = args.run_dir, list(args.overrides)
    if run_dir is not None and "=" in run_dir and not Path(run_dir).is_dir():  # the first item is an override
        overrides.insert(0, run_dir)
        run_dir = None
    run_dir = run_dir or os.environ.get("HYBRIDAD_RUN_DIR")
    if not run_dir:
        raise UserError("evaluate needs a run directory (argument or HYBRIDAD_RUN_DIR)")
    if args.best:
        if overrides:
            raise UserError("evaluate --best re-creates the best evaluation as it was; drop the overrides "
                            f"({' '.join(overrides)})")
        folder = recreate_best(Path(run_dir), args.best)
    else:
        folder = create_evaluation(Path(run_dir), overrides, write_masks=args.write_masks)
    print(folder)  # the last line: scripts take the evaluation directory from here
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from data_modules.checks import check_dataset
    from data_modules.datamodule import DataConfig
    from hybridad.config import parse_overrides

    overrides = parse_overrides(list(args.overrides))
    bad = [k for k in overrides if k != "data"]
    if bad:
        raise UserError(f"data check: only data.* keys apply (got {', '.join(map(str, bad))})")
    data = OmegaConf.structured(DataConfig)
    try:
        data = OmegaConf.merge(data, overrides.get("data") or {}, {"format": args.format})
    except Exception as err:  # an unknown data.* key or a wrong type
        raise UserError(f"data check: {str(err).splitlines()[0]}") from None
    print(check_dataset(Path(args.root), args.category, OmegaConf.to_object(data)))
    return 0


def _cmd_cache_prune(args: argparse.Namespace) -> int:
    from data_modules.cache import default_cache_root, prune_cache

    root = Path(args.cache_dir) if args.cache_dir else default_cache_root()
    removed = prune_cache(root, args.older_than, dry_run=args.dry_run)
    for path in removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {path}")
    print(f"{root}: {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} unused for more than "
          f"{args.older_than:g} days {'would be ' if args.dry_run else ''}removed")
    return 0


def _cmd_submission_write(args: argparse.Namespace) -> int:
    from hybridad.submission import write_submission

    provenance = write_submission([Path(p) for p in args.sources], Path(args.out), overwrite=args.overwrite)
    print(f"provenance: {provenance}")
    print(f"wrote {args.out}")
    return 0


def _cmd_submission_check(args: argparse.Namespace) -> int:
    from hybridad.submission import check_submission, expected_counts

    counts = expected_counts(args.categories, Path(args.data_root) if args.data_root else None)
    problems = check_submission(Path(args.dir), counts)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{args.dir}: submission OK ({len(counts)} categories: {', '.join(counts)})")
    return 0


def _cmd_submission_pack(args: argparse.Namespace) -> int:
    from hybridad.submission import expected_counts, pack_submission

    counts = expected_counts(args.categories, Path(args.data_root) if args.data_root else None)
    print(pack_submission(Path(args.dir), Path(args.out), expected_counts=counts))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from hybridad.report import write_report

    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report"
    print(write_report([Path(p) for p in args.run_dirs], out, num_overlays=args.overlays))
    print(f"report: {out / 'index.html'}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from hybridad.branches import get_branch

    convert = get_branch(args.branch.replace("-", "_")).convert
    assert convert is not None  # the choices are the branches with a converter
    convert(Path(args.ckpt), Path(args.out))
    print(f"wrote {args.out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from hybridad.predict import predict

    predict(Path(args.run_dir), args.images, Path(args.out), device=args.device, batch_size=args.batch_size,
            evaluation=Path(args.evaluation) if args.evaluation else None, overlays=not args.no_overlays,
            foreground=args.foreground)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from hybridad.export import export_run

    print(f"wrote {export_run(Path(args.run_dir), Path(args.out), device=args.device)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from hybridad.demo import run_demo

    run_demo(Path(args.out), args.overrides, categories=args.categories)
    return 0


STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device: free space or write elsewhere (out_dir=..., --out ...)",
    errno.EDQUOT: "disk quota exceeded: free space or write elsewhere (out_dir=..., --out ...)",
    errno.EACCES: "permission denied: write somewhere you may write (out_dir=..., --out ...)",
    errno.EPERM: "operation not permitted: write somewhere you may write (out_dir=..., --out ...)",
    errno.EROFS: "read-only file system: write somewhere writable (out_dir=..., --out ...)",
    errno.ENOENT: "no such file or folder (or none can be created there, as under /proc): check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "is a folder: give a file name",
    errno.ENAMETOOLONG: "file name too long (at most 255 bytes per name): use a shorter name",
    errno.EEXIST: "a file is in the way of a folder of this path: check the path",
}


def storage_error_line(err: BaseException) -> str | None:
    """One line for a full, unwritable or read-only disk anywhere in `err`'s chain (naming the path)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            where = current.filename or "(path unknown)"
            return f"{where}: {STORAGE_ERRNOS[current.errno]}"
        current = current.__cause__ or current.__context__
    return None


def _add_scope_options(q: argparse.ArgumentParser, verb: str) -> None:
    """`--categories` and `--data-root`: which categories a submission tree holds and how many files each."""
    q.add_argument("--categories", nargs="+", default=None, metavar="CAT",
                   help=f"{verb} a tree that holds only these categories (default: all 8)")
    q.add_argument("--data-root", default=None, metavar="ROOT",
                   help="expect as many files per private split as this dataset root has "
                   "(default: the official counts)")


TRAIN_EPILOG = """\
config keys (key=value, YAML values; an unknown key is an error):
  top level     branch, name, seed, out_dir, predict_private,
                resume=latest (newest running/failed/killed run of data.category) or resume=<run dir>
  data.*        root, category, batch_size, global_batch_size, eval_batch_size, num_workers, cache,
                cache_dir, tiling.*, augment.*, cut_paste.*
  inp_former.*  encoder, weights, checkpoint, preset, lr, warmup_steps, ...
  cpr.*         weights, checkpoint, preset, image_size, store_dtype, ...
  branch_options.*  options of a registered branch without its own section (docs/extending_branches.md)
  postprocess.*, threshold.*, checkpoint.every_n_steps, trainer.* (Lightning Trainer), logging.*
every key with its value: hybridad train --show-config data.category=can   (README: Configuration)
"""


def build_parser() -> argparse.ArgumentParser:
    from hybridad.branches import all_branches  # light: fills the registry, imports no model code

    parser = argparse.ArgumentParser(prog="hybridad", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fit, test on test_public, predict the private splits",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. data.category=can), and "
                   "config=my.yaml (a YAML file of overrides, merged before them)")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config (every key, with these overrides) and exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("train-all", help="train every category (one process each; --gpus 0,1,2,3: one per GPU); "
                       "skips completed ones, prints a summary")
    p.add_argument("--categories", nargs="*", default=None, help="subset (default: all 8)")
    p.add_argument("--gpus", default="", help="comma-separated GPU indices: one category per GPU at a time")
    p.add_argument("--jobs", type=int, default=1, help="without --gpus: categories at once on the CPU")
    p.add_argument("--slurm-array", action="store_true",
                   help="train categories[$SLURM_ARRAY_TASK_ID] only (sbatch --array=0-7)")
    p.add_argument("--summary", action="store_true", help="only print each category's state from its runs")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every category")
    p.set_defaults(func=_cmd_train_all)

    p = sub.add_parser("evaluate", help="re-score a run's cached maps with other post-processing/thresholds "
                       "into a new <run>/evaluations/<id>/ (printed last)")
    p.add_argument("run_dir", nargs="?", default=None, help="run directory (default: $HYBRIDAD_RUN_DIR)")
    p.add_argument("overrides", nargs="*", help="postprocess.* / threshold.* overrides")
    p.add_argument("--write-masks", action="store_true", help="also write the masks of all four splits")
    p.add_argument("--best", metavar="METRIC", default=None,
                   help="re-create the run's best evaluation by METRIC (e.g. test_public/seg_f1), with masks")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("check", help="list and validate every split of a category (any layout)")
    q.add_argument("--root", required=True, help="dataset root (<root>/<category>/...)")
    q.add_argument("--category", required=True, help="category folder name, e.g. can or bracket")
    q.add_argument("--format", default="mvtec_ad2",
                   help="layout: mvtec_ad2 (default), mvtec_ad, visa, realiad, folder (docs/own_data.md)")
    q.add_argument("overrides", nargs="*", help="data.* settings, e.g. data.layout.normal_test=good_test")
    q.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("cache", help="the decoded-image cache (data.cache_dir)")
    csub = p.add_subparsers(dest="cache_command", required=True)
    q = csub.add_parser("prune", help="delete entries no job has built or opened for more than --older-than "
                        "days (builds never delete other entries)")
    q.add_argument("--older-than", type=float, required=True, metavar="DAYS",
                   help="age in days; pick more than your longest job (an entry is stamped when a job opens it)")
    q.add_argument("--cache-dir", default=None,
                   help="cache root (default: $HYBRIDAD_CACHE_DIR, $XDG_CACHE_HOME/hybridad or ~/.cache/hybridad)")
    q.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    q.set_defaults(func=_cmd_cache_prune)

    p = sub.add_parser("submission", help="write, check or pack the official server tree")
    ssub = p.add_subparsers(dest="submission_command", required=True)
    q = ssub.add_parser("write", help="write the server tree from run or evaluation directories")
    q.add_argument("sources", nargs="+", metavar="DIR",
                   help="one per category: a run directory or <run>/evaluations/<id>")
    q.add_argument("--out", required=True,
                   help="the tree's folder; its provenance goes beside it, to <out>.provenance.yaml")
    q.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    q.set_defaults(func=_cmd_submission_write)
    q = ssub.add_parser("check", help="apply every rule of the official checker")
    q.add_argument("dir", help="the submission tree (anomaly_images/ and anomaly_images_thresholded/)")
    _add_scope_options(q, "check")
    q.set_defaults(func=_cmd_submission_check)
    q = ssub.add_parser("pack", help="check a tree, then pack it into a .tar.gz")
    q.add_argument("dir", help="the submission tree written by `submission write`")
    q.add_argument("--out", required=True, help="the archive (.tar.gz), replaced if it exists")
    _add_scope_options(q, "check and pack")
    q.set_defaults(func=_cmd_submission_pack)

    p = sub.add_parser("report", help="index.html + report.md: tables, PRO curves, histograms, lighting, overlays")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="completed run directories, one per category")
    p.add_argument("--out", default=None, help="output folder (default: <first run dir>/report)")
    p.add_argument("--overlays", type=int, default=2, help="best and worst overlays per category (0 = none)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("convert", help="convert an official checkpoint into a hybridad weight file")
    p.add_argument("branch", choices=[b.cli_name for b in all_branches() if b.convert],
                   help="which official code wrote the checkpoint")
    p.add_argument("ckpt", help="the official checkpoint (INP-Former model.pth, CPR e.g. 01300.pth)")
    p.add_argument("--out", required=True,
                   help="the hybridad weight file to write (then inp_former.checkpoint= or cpr.checkpoint=)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("predict", help="maps, masks, overlays and scores.csv of new images")
    p.add_argument("run_dir", help="run directory, or a .pt2 written by `hybridad export`")
    p.add_argument("images", nargs="+", help="image files, folders (their images) or glob patterns")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: data.eval_batch_size)")
    p.add_argument("--evaluation", default=None,
                   help="take threshold and post-processing from this evaluation directory")
    p.add_argument("--no-overlays", action="store_true", help="skip overlays/<name>.png")
    p.add_argument("--foreground", action="store_true",
                   help="AND every mask with the image's HSV k-means object mask (walnuts' rule for mixed "
                        "lighting; never inferred from the image paths)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="one self-contained .pt2 (torch.export) of a run's category")
    p.add_argument("run_dir", help="a completed run directory")
    p.add_argument("--out", required=True, help="output file (.pt2)")
    p.add_argument("--device", default="cpu", help="device the exported program runs on (cpu or cuda)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="synthetic data -> tiny models -> evaluation -> submission -> report")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--categories", nargs="*", default=None, metavar="CAT",
                   help="the categories to run (default: all 8); put key=value overrides before this option")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo's config (as for train)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` items after an option (`evaluate RUN --write-masks k=v`) are still overrides
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        code = args.func(args)
    except UserError as err:
        print(f"hybridad: error: {err}", file=sys.stderr)
        code = 2
    except Exception as err:
        line = storage_error_line(err)
        if line is None:
            raise
        print(f"hybridad: error: {line}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("hybridad: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
