"""What every command checks before it writes anything, and how a mistake is reported.

Below both families' command modules (it imports the data readers, the checkpoint reader, the paths and
NWD's auto settings, never a command), so that the commands of both detector families share it without
importing each other. A mistake is one
``error:`` line: exit 2 for a flag no run can use, 1 for data that cannot be used or a failure while
working; the traceback before it only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from ultralytics.data.utils import check_det_dataset, img2label_paths
from ultralytics.nn.tasks import guess_model_task
from ultralytics.utils import LOGGER

from yolo_sizeloss.checkpoints import load_checkpoint
from yolo_sizeloss.detections import ImageRecord, load_split, split_image_files, training_box_sizes
from yolo_sizeloss.methods.nwd import needs_training_boxes, resolve_nwd_auto
from yolo_sizeloss.paths import resolve_data, run_data_path

TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ultralytics colours its messages for terminals
DOWNLOAD_NOTE = " Note dataset download directory"  # Ultralytics' advice on a missing split: nothing is downloaded here


class DataError(Exception):
    """The data (a data yaml, its images or labels, a checkpoint) cannot be used; exit 1."""


def check_detection_network(network: torch.nn.Module | str | dict, name: str, command: str) -> None:
    """Refuse a classify, pose or segment network (a module, a model yaml's name or its dict) before
    anything is written: Ultralytics would make the run folder before the detection code fails on it."""
    if (task := guess_model_task(network)) != "detect":
        raise DataError(f"{name} is a '{task}' model; {command} detection models only")


class SettingsError(ValueError):
    """A setting the run cannot honour that only the trainer can tell (Ultralytics decides which settings
    a resumed run may change); raised before anything is written, reported as a usage mistake (exit 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the program, not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def non_empty(text: str) -> str:
    """An argparse type for a flag that names something (a file, a loss, a folder): an empty value, as an unset
    shell variable gives ``--data "$DATA"``, is an error rather than the flag's default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value (leave the flag out for its default)")
    return text


def one_line(error: BaseException | str) -> str:
    """An exception's message (or a text) on one line, without terminal colour codes."""
    return " ".join(TERMINAL_CODES.sub("", str(error)).split()) or type(error).__name__


RESUME_HINT = " (a training run continues from its last finished epoch: --resume RUN/weights/last.pt)"


def run_guarded(prog: str, check: Callable[[], Any], work: Callable[[Any], Any], verbose: bool,
                interrupted: str = "") -> int:
    """Run ``work(check())`` and return the exit code: a ValueError or FileNotFoundError from ``check``
    (or a SettingsError from ``work``) is a usage error (exit 2, prefixed with ``prog``), a DataError
    exit 1, any other failure exit 1 with a pointer to ``--verbose``; each one ``error:`` line, after
    the traceback when ``verbose``. Ctrl-C is one ``interrupted`` line (with the ``interrupted`` hint, what
    the user can do next) and exit 130, as a shell reports it."""

    def report(error: Exception, code: int, hint: str = "") -> int:
        if verbose:  # the traceback, then the same line and exit code as without it
            traceback.print_exception(error)
            hint = ""
        print(f"{prog}: error: {one_line(error)}{hint}", file=sys.stderr)
        return code

    def stopped(error: KeyboardInterrupt) -> int:
        if verbose:
            traceback.print_exception(error)
        print(f"{prog}: interrupted{interrupted}", file=sys.stderr)
        return 130

    try:
        checked = check()
    except KeyboardInterrupt as e:  # not an Exception: the label scan of a large data set can take a while
        return stopped(e)
    except DataError as e:
        return report(e, 1)
    except (ValueError, FileNotFoundError) as e:  # LossConfigError is a ValueError
        return report(e, 2)
    except Exception as e:  # a check that failed in a library it calls: still one line
        return report(e, 1, " (--verbose shows the traceback)")
    try:
        work(checked)
    except KeyboardInterrupt as e:
        return stopped(e)
    except SettingsError as e:
        return report(e, 2)
    except DataError as e:
        # bad data found only while working (a split's labels, the classes a checkpoint knows) is the
        # user's to fix, not a failure to debug: no pointer to the traceback
        return report(e, 1)
    except Exception as e:
        return report(e, 1, " (--verbose shows the traceback)")
    return 0


@dataclass(frozen=True)
class Device:
    """A parsed ``--device``: ``kind`` is ``auto`` (CUDA if there is one, else the CPU), ``cpu``,
    ``mps`` or ``cuda`` with its ``indices``."""

    kind: str
    indices: tuple[int, ...] = ()


def parse_device(device: str | None, allow_mps: bool = True) -> Device:
    """The one reading of ``--device`` for both families: '' or -1 (auto), cpu, mps, a CUDA index
    (0, cuda:0, or cuda: the first) or a list (0,1). A device this machine lacks is a ValueError naming
    the flag, so a run never starts on another device than the one asked for."""
    spec = str(device or "").strip().lower().replace("cuda:", "")
    if spec == "cuda":  # Ultralytics' word for the first CUDA device
        spec = "0"
    if spec in ("", "-1"):
        return Device("auto")
    if spec == "cpu":
        return Device("cpu")
    if spec == "mps":
        if not allow_mps:
            raise ValueError(f"--device {device}: the Faster R-CNN path runs on cpu or CUDA devices")
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: Apple's MPS is not available on this machine; use --device cpu")
        return Device("mps")
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    if not ids or not all(s.isdigit() for s in ids):
        raise ValueError(f"--device {device}: expected cpu, mps, a CUDA index such as 0, or a list such as 0,1")
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")
    missing = [s for s in ids if int(s) >= count]
    if missing:
        raise ValueError(f"--device {device}: no CUDA device {missing[0]} (this machine has {count})")
    return Device("cuda", tuple(int(s) for s in ids))


def torchrun_world_size() -> int:
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def parse_process_device(device: str | None, world_size: int) -> Device:
    """``--device`` for the Faster R-CNN path (``parse_device`` without MPS): a CUDA list names one device
    per torchrun process, so its length must be ``world_size``; checked with the flags, since the engine
    would meet it only after the data scan and the model build."""
    parsed = parse_device(device, allow_mps=False)
    if parsed.indices and len(parsed.indices) != world_size:
        raise ValueError(f"--device {device}: {len(parsed.indices)} device(s) for {world_size} process(es) "
                         f"(one CUDA device per torchrun process: torchrun --nproc_per_node {len(parsed.indices)})")
    return parsed


def same_setting(key: str, given: Any, saved: Any) -> bool:
    """Whether a flag given on resume (``key``, the parsed ``given``) asks for what the run already has (``saved``,
    from its checkpoint): a data yaml by the file it names, a folder or file by its absolute path, a number by value."""
    if given == saved:
        return True
    if saved is None:
        return False
    if key == "data":
        try:
            return Path(resolve_data(given)).resolve() == Path(run_data_path(str(saved))).resolve()
        except FileNotFoundError:
            return False
    if key in ("model", "project", "weights"):
        return Path(str(given)).expanduser().resolve() == Path(str(saved)).expanduser().resolve()
    return False


def check_resume_keeps_settings(given: dict[str, Any], saved: dict[str, Any], changeable: tuple[str, ...]) -> None:
    """A resumed run keeps its own settings: a ValueError naming each flag in ``given`` whose value is not the run's
    (``saved``, its checkpoint's training arguments) and the flags that may change (``changeable``); a flag that
    repeats the run's own value is fine."""
    differ = [k for k, v in given.items() if not same_setting(k, v, saved.get(k))]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (the run's: {saved.get(k)})" for k in differ)
        raise ValueError(f"--resume continues the run with its own settings; {flags} cannot change on resume "
                         f"(allowed: {', '.join('--' + k for k in changeable)})")


def check_resume_file(resume: str) -> None:
    """``--resume`` names a checkpoint file, either family; a run folder given instead is pointed to its
    last.pt."""
    if Path(resume).is_dir():
        raise ValueError(f"--resume {resume}: a folder; give the checkpoint to continue, such as "
                         f"{Path(resume) / 'weights' / 'last.pt'}")
    if not Path(resume).is_file():
        raise ValueError(f"--resume {resume}: no such checkpoint")


def read_resume_checkpoint(resume: str, arch: str | None = None) -> dict:
    """The checkpoint ``--resume`` names, either family (``arch``: checked to be that family's, as
    ``load_checkpoint`` does); a file that is not one is a DataError naming the flag."""
    check_resume_file(resume)
    try:
        return load_checkpoint(resume, arch)
    except ValueError as e:
        raise DataError(flag_error("--resume", resume, e)) from e


def after_path(error: Exception, path: str | Path) -> str:
    """``error``'s one line without the ``PATH: `` it starts with (``load_checkpoint``'s, a data check's), for a
    message that names the path itself."""
    return one_line(error).removeprefix(f"{Path(path)}: ")


def flag_error(flag: str, path: str, error: Exception) -> str:
    """``--flag PATH: what is wrong``, from an error whose text names ``path`` first."""
    return f"{flag} {path}: {after_path(error, path)}"


def resumed_run_folder(resume: str) -> Path:
    """The run folder a ``--resume`` continues in, either family: the one holding ``weights/last.pt``,
    where the user left it; a checkpoint outside a run folder is a ValueError naming the flag."""
    last = Path(resume).resolve()
    if last.parent.name != "weights":
        raise ValueError(f"--resume {resume}: a resumed run continues in its run folder, and this checkpoint "
                         "is not in one (RUN/weights/last.pt)")
    return last.parent.parent


def check_resume_is_latest(resume: str, epoch: int) -> None:
    """A checkpoint ``--resume`` names other than its run's ``weights/last.pt`` (``best.pt`` and saved
    epochs keep their optimizer while the run trains) must not be older than last.pt: resuming it would
    cut results.csv back to its epoch and save over the later last.pt. Either family (``epoch``: the
    0-based epoch a checkpoint finished); an unreadable last.pt is no objection, as it may be the reason
    for resuming another checkpoint."""
    given = Path(resume).resolve()
    last = given.parent / "last.pt"
    if given == last or not last.is_file():
        return
    try:
        latest = load_checkpoint(last)["epoch"]
    except (ValueError, KeyError):
        return
    if isinstance(latest, int) and latest > epoch:
        raise ValueError(f"--resume {resume}: holds {epoch + 1} trained epochs and the run's last.pt {latest + 1}; "
                         f"resuming it would drop the later epochs: resume {last}, or resume a copy of the run folder")


def check_resumed_epochs(epochs: int | None, trained: int) -> None:
    """A new ``--epochs`` total on resume (None: keep the run's own) must leave something to train;
    both families' ``--resume`` say so in the same words."""
    if epochs is not None and epochs <= trained:
        raise ValueError(f"--epochs {epochs}: the run has already trained {trained} epochs")


def output_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be written as a new output file (a folder, or in no folder), or None: for the
    scripts that write one file at the end of long work, to say so before the work."""
    out = Path(path)
    return "must be a file in an existing folder" if out.is_dir() or not out.parent.is_dir() else None


def check_output_folder(folder: str, flag: str) -> None:
    """A folder a command will make (or write in), such as ``--project``: where the part that exists is
    a file or cannot be written in, the error names the flag before anything runs (not an OSError
    after the run has started)."""
    path = Path(folder).expanduser().resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {folder}: {existing} is a file, not a folder")
    # permission bits say nothing for root or for /proc and read-only mounts: make a folder and remove it
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot make a folder in {existing} ({e.strerror})") from None


def check_run_name(name: str | None) -> None:
    """``--name`` (None: not given) is one folder inside ``--project``: an empty name or '.' would be the project
    folder itself, which Ultralytics' incrementing turns into a PROJECT-2 beside it; a '..' anywhere can climb
    out of it."""
    if name is not None and (not name.strip() or Path(name).name in ("", ".") or ".." in Path(name).parts
                             or Path(name).is_absolute()):
        raise ValueError(f"--name {name!r}: must name a folder inside --project")


def check_resumed_data(resume: str, data: str) -> tuple[str, CheckedSplits]:
    """The data yaml a resumed run trained on (``check_data_yaml``) and its splits, checked again (images may
    have moved since); a DataError says it is the run's data, not the command line, that is at fault. For
    both families' ``--resume``."""
    try:
        checked = check_data_yaml(data)
        return checked, check_training_splits(checked)
    except (DataError, FileNotFoundError) as e:
        raise DataError(f"--resume {resume}: the run's data: {one_line(e)}") from e


def check_data_yaml(data: str) -> str:
    """The absolute path of a usable data yaml (Ultralytics' own check); DataError naming the file otherwise."""
    return checked_data(data)[0]


def checked_data(data: str) -> tuple[str, dict]:
    """``check_data_yaml``'s path with the data dict Ultralytics' check returned (class names, ``nc``)."""
    path = resolve_data(data)
    # its info lines are about downloads (a blank line before a missing split, here before our one error
    # line), which autodownload=False never makes; its warnings still show
    try:
        with ultralytics_dropping(lambda record: record.levelno < logging.WARNING):
            return path, check_det_dataset(path, autodownload=False)
    except Exception as e:
        message = one_line(e).split(DOWNLOAD_NOTE)[0]
        raise DataError(f"{path}: {message.removeprefix(path).lstrip(': ')}") from e  # some of them name it first


@contextlib.contextmanager
def ultralytics_dropping(drop: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """Ultralytics' logger drops the records ``drop`` picks inside the block: for a stock call whose
    lines would come before, or say again, the one error line of ours that follows it."""

    def keep(record: logging.LogRecord) -> bool:
        return not drop(record)

    LOGGER.addFilter(keep)
    try:
        yield
    finally:
        LOGGER.removeFilter(keep)


class CheckedSplits(NamedTuple):
    """The images ``check_training_splits`` kept (``detections.ImageRecord``) and the data dict of
    Ultralytics' check: what a run trains and validates on, so that its engine reads no label file again."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    data: dict


def check_training_splits(data_yaml: str) -> CheckedSplits:
    """Ultralytics' own label check of the train and val splits, before a run folder exists: a split
    without a usable image is a DataError naming the yaml, the split and why each image was left out
    (images Ultralytics skips among usable ones are a warning, as in its own training)."""
    records = {}
    for split in ("train", "val"):
        try:
            records[split], data = load_split(data_yaml, split)
        except ValueError as e:
            raise DataError(one_line(e)) from e
    # an image without a label file is background, but a training split without any is a misplaced labels
    # folder: Ultralytics' trainer refuses it only after the run folder exists
    images = split_image_files(data, "train")
    labels = img2label_paths(images)
    if not any(Path(label).is_file() for label in labels):
        raise DataError(f"{data.get('yaml_file', data_yaml)} split 'train': none of its {len(images)} images has a "
                        f"label file (for {images[0]} Ultralytics reads {labels[0]})")
    return CheckedSplits(records["train"], records["val"], data)


def check_nwd_needs(loss_config: dict, records: list, imgsz: int) -> None:
    """NWD's ``auto`` settings are computed from the training boxes when training starts; labels
    without a box would stop it there, after the run folder is made, so refuse them now. ``records``:
    the images the run trains on (``first_fraction``); YOLO's trainer measures the same boxes from
    Ultralytics' own labels (``yolo.loss.training_label_sizes``), Faster R-CNN's engine from the same
    records (``rcnn.engine.training_nwd_settings``)."""
    nwd = loss_config.get("nwd")
    if nwd and needs_training_boxes(nwd):
        try:
            resolve_nwd_auto(nwd, *training_box_sizes(records, imgsz), imgsz)
        except ValueError as e:
            raise DataError(one_line(e)) from e


def check_run_flags(epochs: int | None = None, imgsz: int | None = None, batch: int | None = None,
                    workers: int | None = None, fraction: float | None = None, seed: int | None = None) -> None:
    """Values no run could use, naming the flag (None: not given). A negative ``seed`` fails only once the
    run has started: Faster R-CNN seeds NumPy with it, Ultralytics with seed + 1."""
    for flag, value in (("epochs", epochs), ("imgsz", imgsz), ("batch", batch)):
        if value is not None and value < 1 and not (flag == "batch" and value == -1):
            raise ValueError(f"--{flag} {value}: must be at least 1" + (" (or -1: auto)" if flag == "batch" else ""))
    for flag, value in (("workers", workers), ("seed", seed)):
        if value is not None and value < 0:
            raise ValueError(f"--{flag} {value}: must not be negative")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction}: must be in (0, 1]")
