"""Claiming a run directory: one folder per run, chosen once for every process of a (DDP) job.

- A fresh run claims `<out_dir>/<category>/<name>` with `os.mkdir`, which fails if the folder exists, so two
  runs never share one (a clock-made name gets `-2`, `-3`, ... when two runs start in the same second; an
  explicit `name=` that exists is refused).
- The process that owns the run (global rank 0) holds an exclusive `flock` on `<run>/.lock` until it exits;
  a resume finds a run that is still alive and refuses it. A killed process drops the lock with it.
- Every rank of a job uses the folder rank 0 chose: Lightning's own launcher re-runs the command for the
  other local ranks with `HYBRIDAD_CLAIMED_RUN` in their environment; under an external launcher (torchrun,
  SLURM `srun`) every process starts on its own, so the process group is initialised first and rank 0
  broadcasts the folder (or its error, any error, as one line) to the others.
- `<category>/latest` is a relative symlink that moves only to a completed run.
"""

from __future__ import annotations

import fcntl
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybridad.errors import UserError
from hybridad.run_dir import RunDir

ENV_CLAIMED = "HYBRIDAD_CLAIMED_RUN"
LOCK_NAME = ".lock"
LATEST = "latest"


@dataclass
class Launch:
    """How this process was started: its global rank, the world size and whether an external launcher did it."""

    rank: int
    world_size: int
    external: bool  # torchrun / SLURM started every process; False: a single process (Lightning may spawn)
    child: bool  # a rank that Lightning's launcher started for a run its parent already claimed
    main_address: str = ""  # rank 0's host and port (external launchers)
    main_port: int = 0


def detect_launch() -> Launch:
    """Read the launcher's environment (Lightning's cluster environments, so the rules match the Trainer's)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if os.environ.get(ENV_CLAIMED):
        return Launch(rank=-1, world_size=-1, external=False, child=True)
    for env_cls in (TorchElasticEnvironment, SLURMEnvironment):
        if env_cls.detect():
            env = env_cls()
            if env.world_size() > 1:
                return Launch(env.global_rank(), env.world_size(), external=True, child=False,
                              main_address=env.main_address, main_port=env.main_port)
    return Launch(rank=0, world_size=1, external=False, child=False)


def claim_new_run(out_dir: str | Path, category: str, name: str) -> Path:
    """Create a new, empty run folder atomically and return it.

    `name` empty: the clock (`YYYYmmdd-HHMMSS`), with `-2`, `-3`, ... when that folder exists already.
    `name` given: refused with one line when it exists (resume it with `resume=<run dir>` instead).
    """
    parent = Path(out_dir) / category
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(parent)) from err
    if name:
        if "/" in name or name in (".", "..", LATEST):
            raise UserError(f"name='{name}' is not a valid run name (no '/', not '.', '..' or 'latest')")
        run = parent / name
        try:
            run.mkdir()
        except FileExistsError:
            raise UserError(f"run directory {run} exists already: choose another name= or continue it with "
                            f"resume={run}") from None
        return run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        run = parent / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            run.mkdir()
            return run
        except FileExistsError:
            continue
    raise UserError(f"could not claim a new run directory in {parent} (1000 runs started in one second?)")


def run_dirs_of(out_dir: str | Path, category: str) -> list[Path]:
    """The run folders of a category (those with a config.yaml), oldest first by the config's time."""
    parent = Path(out_dir) / category
    if not parent.is_dir():
        return []
    runs = [p for p in parent.iterdir()
            if p.name != LATEST and not p.is_symlink() and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda p: ((p / "config.yaml").stat().st_mtime_ns, p.name))


def resolve_resume_target(spec: str, out_dir: str | Path, category: str) -> Path:
    """`resume=latest` (the newest run of the category that has not completed: running, failed or killed) or
    `resume=<run dir>` -> the run folder to continue."""
    if spec == "latest":
        runs = run_dirs_of(out_dir, category)
        if not runs:
            raise UserError(f"resume=latest: no run of {category} in {Path(out_dir) / category}")
        unfinished = [r for r in runs if RunDir(r).read_state().get("state") != "completed"]
        if not unfinished:
            raise UserError(f"resume=latest: every run of {category} in {Path(out_dir) / category} has completed; "
                            "nothing to resume (start a new run without resume=)")
        return unfinished[-1].resolve()
    run = Path(spec)
    if not (run / "config.yaml").is_file():
        raise UserError(f"resume={spec}: not a hybridad run directory (no config.yaml); "
                        "give the folder `hybridad train` printed, or resume=latest")
    return run.resolve()


def lock_run(run: Path) -> int:
    """Take the run's exclusive lock for this process's lifetime; `UserError` if another process holds it."""
    path = run / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"run {run} is in use by another running process; wait for it or stop it "
                        "first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def run_is_live(run: Path) -> bool:
    """Whether a process holds the run's lock now (a run left `running` by a killed process holds none)."""
    try:
        fd = os.open(Path(run) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops a lock this probe took
    return False


def unlock_run(fd: int | None) -> None:
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def check_resumable(run: Path) -> None:
    """`UserError` unless the run can be continued (it exists and has not completed)."""
    state = RunDir(run).read_state().get("state")
    if state == "completed":
        raise UserError(f"resume: run {run} has completed; nothing to resume (start a new run without resume=)")
    last = Path(run) / "checkpoints" / "last.ckpt"
    if last.is_file():
        try:
            with zipfile.ZipFile(last):  # reads the central directory at the end: a truncated copy fails here
                pass
        except (zipfile.BadZipFile, OSError) as err:
            raise UserError(f"resume: {last} is truncated or corrupt ({err}); restore it, or delete it to "
                            "restart this run from step 0") from None


def publish_latest(run: Path) -> None:
    """Point `<category>/latest` at `run` (atomically, by renaming a fresh relative symlink over it)."""
    latest = run.parent / LATEST
    if latest.exists() and not latest.is_symlink():
        return  # a real folder named 'latest' is the user's: leave it alone
    tmp = run.parent / f".{LATEST}-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)
    os.replace(tmp, latest)


def agree_on_run(choose: Callable[[], Path], launch: Launch, backend: str) -> Path:
    """The run folder every process of the job uses: `choose()` runs once, on the process that owns the run.

    Lightning's launcher children read it from `HYBRIDAD_CLAIMED_RUN`. Under an external launcher the default
    process group is initialised here (Lightning then reuses it) and rank 0's folder, or its error, is
    broadcast to every rank.
    """
    if launch.child:
        return Path(os.environ[ENV_CLAIMED])
    if not launch.external:
        return choose()
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.main_address)  # SLURM sets neither; Lightning derives both
        os.environ.setdefault("MASTER_PORT", str(launch.main_port))
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size)
    message: list[object] = [None]
    if launch.rank == 0:
        try:
            message = [str(choose())]
        except Exception as err:  # any failure (claim, lock, validation, OSError) ends every rank at once
            line = setup_failure_line(err)
            dist.broadcast_object_list([UserError(line)], src=0)
            if isinstance(err, UserError):
                raise
            raise UserError(line) from err
    dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], UserError):
        raise message[0]
    return Path(str(message[0]))


def setup_failure_line(err: Exception) -> str:
    """The one line every rank reports when rank 0 could not set the run up (a `UserError`'s own text)."""
    if isinstance(err, UserError):
        return str(err)
    text = " ".join(str(err).split()) or type(err).__name__
    return f"setting up the run failed on rank 0: {type(err).__name__}: {text}"[:500]
