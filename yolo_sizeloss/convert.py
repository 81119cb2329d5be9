"""Convert a Pascal-VOC data set (XML boxes) to the Ultralytics YOLO format.

    python -m yolo_sizeloss.convert SRC DST [--classes "RBC, WBC, Platelets"] [--splits train,val,test]
        [--overwrite] [--verbose]

SRC holds ``Annotations/*.xml``, ``JPEGImages/*`` and ``ImageSets/Main/<split>.txt``. DST gets
``images/<split>/`` (copies), ``labels/<split>/*.txt`` (``cls xc yc w h``, normalised) and a
``data.yaml`` with an absolute ``path``. Nothing is dropped silently: degenerate boxes are dropped
with a warning, boxes past the image border are clipped with a warning, and the summary counts both.
An unknown class, an unreadable XML file or a missing or unreadable image is an error that names the file.
A DST that already holds images, labels or a data yaml is refused, naming what it holds, unless
``overwrite`` is set; then the log names what is replaced, and the replaced splits stay until the new ones
are written in full.
"""

from __future__ import annotations

import math
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image
from ultralytics.data.utils import IMG_FORMATS, exif_size
from ultralytics.utils import TQDM

from yolo_sizeloss.checks import DataError, OneLineParser, run_guarded

BCCD_CLASSES = ("RBC", "WBC", "Platelets")
STAGING = ".converting"  # DST's folder for the splits being written
PROGRESS_FROM = 1000  # images from which reading and writing show a bar (each takes seconds by then)


class ConversionError(DataError):
    """Bad VOC input: the message names the file (and the object) at fault."""


class UsageError(ValueError):
    """Arguments that cannot be carried out as given: a missing source, an output that is a file or
    that already holds a data set."""


@dataclass
class ConversionSummary:
    """What a conversion kept, dropped and clipped, per split and per class."""

    images: dict[str, int] = field(default_factory=dict)
    kept: int = 0
    dropped: int = 0
    clipped: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in self.images.items())
        classes = ", ".join(f"{k} {v}" for k, v in self.per_class.items())
        return (
            f"images: {sum(self.images.values())} ({splits}); boxes kept: {self.kept} ({classes}); "
            f"dropped: {self.dropped}; clipped: {self.clipped}"
        )


def _read_number(obj: ET.Element, tag: str, xml_path: Path, index: int) -> float:
    node = obj.find(f"bndbox/{tag}")
    try:
        value = float(node.text)  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        raise ConversionError(f"{xml_path}: object {index}: missing or non-numeric <{tag}>") from None
    # float() reads "nan" and "inf"; a NaN passes every comparison below and would reach the label file
    if not math.isfinite(value):
        raise ConversionError(f"{xml_path}: object {index}: <{tag}> is {node.text.strip()!r}, not a finite number")
    return value


def voc_to_yolo_lines(
    xml_path: Path, image: Path, classes: tuple[str, ...], summary: ConversionSummary
) -> list[str]:
    """Return the YOLO label lines of one VOC file, updating ``summary`` and warning on bad boxes. The
    boxes are normalised by the XML's ``<size>`` (the frame they were drawn in, as Ultralytics' own VOC
    script does); where ``image`` is another size (upright, as Ultralytics reads it), a warning says so."""
    try:
        root = ET.parse(xml_path).getroot()
        width = float(root.find("size/width").text)  # type: ignore[union-attr]
        height = float(root.find("size/height").text)  # type: ignore[union-attr]
    except ET.ParseError as e:
        raise ConversionError(f"{xml_path}: unreadable XML ({e})") from None
    except (AttributeError, TypeError, ValueError):
        raise ConversionError(f"{xml_path}: missing or non-numeric <size><width>/<height>") from None
    if not (0 < width < math.inf and 0 < height < math.inf):  # also false for NaN
        raise ConversionError(f"{xml_path}: image size {width}x{height} is not positive and finite")
    try:
        with Image.open(image) as opened:
            actual = exif_size(opened)  # (width, height), from the header
    except Exception as e:
        # Pillow raises OSError, or DecompressionBombError over its pixel limit; Ultralytics' patched Image.open
        # meets a file Pillow cannot identify by importing the HEIF plugin, an ImportError where that is
        # missing whose context is Pillow's error
        cause = e.__context__ if isinstance(e, ImportError) and e.__context__ else e
        raise ConversionError(f"{image}: unreadable image ({cause})") from None
    if actual != (width, height):
        summary.warnings.append(f"{xml_path}: <size> {width:g}x{height:g}, but {image.name} is {actual[0]}x{actual[1]}; "
                                "boxes normalised by the XML's size")

    lines = []
    for index, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise ConversionError(
                f"{xml_path}: object {index}: unknown class {name!r} (not in --classes: {', '.join(classes)}; "
                "its default is BCCD's)"
            )
        box = [_read_number(obj, t, xml_path, index) for t in ("xmin", "ymin", "xmax", "ymax")]
        x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
        x1, y1 = min(box[2], width), min(box[3], height)
        where = f"{xml_path}: object {index} ({name}) box {[int(v) if v.is_integer() else v for v in box]}"
        if x1 <= x0 or y1 <= y0:
            summary.dropped += 1
            summary.warnings.append(f"{where}: zero-area or inverted, dropped")
            continue
        if (x0, y0, x1, y1) != tuple(box):
            summary.clipped += 1
            summary.warnings.append(f"{where}: outside the {width:g}x{height:g} image, clipped")
        summary.kept += 1
        summary.per_class[name] = summary.per_class.get(name, 0) + 1
        xc, yc = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        w, h = (x1 - x0) / width, (y1 - y0) / height
        lines.append(f"{classes.index(name)} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}")
    return lines


def _find_image(images_dir: Path, stem: str, xml_path: Path) -> Path:
    for suffix in sorted(IMG_FORMATS):  # the image types Ultralytics reads
        for candidate in (images_dir / f"{stem}.{suffix}", images_dir / f"{stem}.{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    raise ConversionError(f"{xml_path}: image {stem}.* not found in {images_dir}")


def _describe(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, with its file count if it is a folder."""
    name = path.relative_to(root).as_posix()
    if path.is_dir():
        return f"{name}/ ({sum(p.is_file() for p in path.rglob('*'))} files)"
    return name


def existing_outputs(dst: Path) -> list[Path]:
    """What ``dst`` already holds of a YOLO data set: the entries of ``images/`` and ``labels/``, and
    ``data.yaml``."""
    found = [p for sub in ("images", "labels") if (dst / sub).is_dir() for p in sorted((dst / sub).iterdir())]
    return found + [p for p in (dst / sub for sub in ("images", "labels", "data.yaml")) if p.is_file()]


def _check_paths(src: Path, dst: Path, splits: tuple[str, ...], overwrite: bool) -> tuple[list[Path], list[Path]]:
    """Refuse a missing source, an output that is a file or one that holds a data set (unless
    ``overwrite``); return the existing paths the conversion replaces and those it leaves alone."""
    if not src.is_dir():
        raise UsageError(f"{src}: VOC source folder not found")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst}: output exists and is not a folder")
    found = existing_outputs(dst)
    if found and not overwrite:
        raise UsageError(
            f"{dst} already holds {', '.join(_describe(p, dst) for p in found)}; nothing was written "
            "(--overwrite replaces images/<split>/, labels/<split>/ and data.yaml)"
        )
    ours = {dst / "data.yaml"} | {dst / sub / name for s in splits for sub, name in
                                  (("images", s), ("labels", s), ("labels", f"{s}.cache"))}
    return [p for p in found if p in ours], [p for p in found if p not in ours]


def _split_folders(dst: Path) -> list[Path]:
    """The splits ``dst`` holds: ``images/`` train, val and test, then any other folder there that has its
    ``labels/`` folder, as a split converted before has (VOC's trainval, say); a folder of images alone
    under another name is not taken for one."""
    images = dst / "images"
    folders = sorted(p for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
    standard = ("train", "val", "test")
    return [images / s for s in standard if images / s in folders] + [
        p for p in folders if p.name not in standard and (dst / "labels" / p.name).is_dir()]


def _check_kept_classes(dst: Path, kept: list[str], classes: tuple[str, ...]) -> None:
    """The splits left in place were labelled for the class list of ``dst``'s data.yaml: another
    ``classes`` would give their class ids other names (or none), so it is refused before writing."""
    data_yaml = dst / "data.yaml"
    try:
        names = yaml.safe_load(data_yaml.read_text())["names"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return  # no readable class list to disagree with: the kept splits are the user's own
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    if names != list(classes):
        raise UsageError(f"{data_yaml} names {names}, --classes {list(classes)}: the splits kept in place "
                         f"({', '.join(kept)}) were labelled for the first; convert them too (--splits) or give "
                         "the same --classes; nothing was written")


@dataclass
class Conversion:
    """A checked conversion (``plan_conversion``), nothing written yet: each image with its split and YOLO
    label lines, the splits found in place that stay in data.yaml, the paths it replaces and those it keeps."""

    dst: Path
    classes: tuple[str, ...]
    splits: tuple[str, ...]
    images: list[tuple[str, Path, list[str]]]
    present: list[str]
    replaced: list[Path]
    kept: list[Path]
    summary: ConversionSummary


def convert_voc(
    src: str | Path,
    dst: str | Path,
    classes: tuple[str, ...] = BCCD_CLASSES,
    splits: tuple[str, ...] = ("train", "val", "test"),
    log=print,
    overwrite: bool = False,
) -> ConversionSummary:
    """Convert the VOC tree at ``src`` into a YOLO tree at ``dst``; return the summary.

    Each warning and the summary line go through ``log``. The whole input is checked before ``dst``
    is written (``plan_conversion``), so an error leaves no half-converted output behind. A ``dst`` holding
    images, labels or a data yaml raises UsageError naming them unless ``overwrite``; then
    ``images/<split>``, ``labels/<split>`` (and Ultralytics' ``labels/<split>.cache``, which would
    describe the old labels) and ``data.yaml`` are replaced (listing also the splits left in place,
    ``_split_folders``), and other entries are left as they are.
    """
    return write_conversion(plan_conversion(src, dst, classes, splits, overwrite), log)


def plan_conversion(
    src: str | Path, dst: str | Path, classes: tuple[str, ...], splits: tuple[str, ...], overwrite: bool
) -> Conversion:
    """Check the VOC tree at ``src`` and the output ``dst`` (``convert_voc``) and read every annotation, writing
    nothing: UsageError for arguments that cannot be carried out, ConversionError naming a bad input file."""
    src, dst = Path(src), Path(dst)
    replaced, kept = _check_paths(src, dst, splits, overwrite)
    # a split this run does not convert but finds in place (--overwrite of some splits; VOC's trainval too)
    # stays in data.yaml, so the data set keeps training (its val split, say): its labels must mean the same
    # classes
    present = [p.name for p in _split_folders(dst) if p.name not in splits]
    if present:
        _check_kept_classes(dst, present, classes)
    summary = ConversionSummary(per_class={c: 0 for c in classes})
    plan: list[tuple[str, Path, list[str]]] = []
    for split in splits:
        list_file = src / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise ConversionError(f"{list_file}: split list not found")
        try:
            text = list_file.read_text()
        except UnicodeDecodeError as e:  # a ValueError, not an OSError: name the file rather than fail
            raise ConversionError(f"{list_file}: not a text file ({e.reason} at byte {e.start})") from None
        listed = [s.strip() for s in text.splitlines() if s.strip()]
        stems = list(dict.fromkeys(listed))
        if len(stems) < len(listed):
            summary.warnings.append(f"{list_file}: {len(listed) - len(stems)} repeated name(s), converted once")
        if not stems:  # Ultralytics would stop at training time with "No images found"
            summary.warnings.append(f"{list_file}: lists no images; the {split} split is empty")
        for stem in TQDM(stems, desc=f"reading {split}", disable=len(stems) < PROGRESS_FROM):
            xml_path = src / "Annotations" / f"{stem}.xml"
            if not xml_path.is_file():
                raise ConversionError(f"{list_file}: {stem}: annotation {xml_path} not found")
            image = _find_image(src / "JPEGImages", stem, xml_path)
            plan.append((split, image, voc_to_yolo_lines(xml_path, image, classes, summary)))
        summary.images[split] = len(stems)
    missing = [s for s in ("train", "val") if s not in (*splits, *present)]
    if missing:  # Ultralytics' check refuses such a data yaml only when a training starts
        summary.warnings.append(f"{dst / 'data.yaml'} lists no {' or '.join(missing)} split, which training needs "
                                "(convert it with --splits, or edit data.yaml)")
    return Conversion(dst, classes, splits, plan, present, replaced, kept, summary)


def write_conversion(conversion: Conversion, log=print) -> ConversionSummary:
    """Write a checked ``conversion`` (``plan_conversion``), each warning and the summary line through ``log``;
    return its summary."""
    dst, splits, replaced, kept = conversion.dst, conversion.splits, conversion.replaced, conversion.kept
    if replaced:
        log(f"replacing {', '.join(_describe(p, dst) for p in replaced)} in {dst}")
    if kept:
        log(f"keeping {', '.join(_describe(p, dst) for p in kept)} in {dst} (not part of this conversion)")
    # the new splits are written beside the old ones and take their place only once complete, so that a full disk
    # or Ctrl-C part-way leaves DST as it was
    staging, made_dst = dst / STAGING, not dst.exists()
    shutil.rmtree(staging, ignore_errors=True)  # a killed conversion's
    try:
        for split in splits:
            for sub in ("images", "labels"):
                (staging / sub / split).mkdir(parents=True)
        for split, image, lines in TQDM(conversion.images, desc="writing", disable=len(conversion.images) < PROGRESS_FROM):
            shutil.copy2(image, staging / "images" / split / image.name)
            (staging / "labels" / split / f"{image.stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
    except BaseException:
        shutil.rmtree(dst if made_dst else staging, ignore_errors=True)
        raise
    for path in replaced:  # a linked split folder loses its link, not what it links to
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for split in splits:
        for sub in ("images", "labels"):
            (dst / sub).mkdir(exist_ok=True)
            (staging / sub / split).rename(dst / sub / split)
    shutil.rmtree(staging)
    data = {"path": str(dst.resolve()), **{s: f"images/{s}" for s in (*splits, *conversion.present)}}
    data["names"] = dict(enumerate(conversion.classes))
    (dst / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    summary = conversion.summary
    for warning in dict.fromkeys(summary.warnings):  # an annotation listed in two splits warns once
        log(f"WARNING {warning}")
    log(str(summary))
    return summary


def name_list(text: str, what: str) -> tuple[str, ...]:
    """Split a comma-separated command-line list, tolerating spaces around the names
    (``"RBC, WBC"``); an empty or repeated name raises UsageError."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise UsageError(f"{what} {text!r}: an empty name (write names separated by single commas)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"{what} {text!r}: {', '.join(repeated)} given more than once")
    return names


def main(argv: list[str] | None = None, prog: str = "python -m yolo_sizeloss.convert") -> int:
    """The command line: 0 on success, 2 for a usage error, 1 for bad data or a failed write; one
    ``error:`` line on stderr, the traceback only with ``--verbose`` (``checks.run_guarded``)."""
    parser = OneLineParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("src", help="VOC root (Annotations/, JPEGImages/, ImageSets/Main/)")
    parser.add_argument("dst", help="output root for images/, labels/ and data.yaml")
    parser.add_argument("--classes", default=",".join(BCCD_CLASSES),
                        help="class names in index order, comma-separated (default: BCCD's, %(default)s)")
    parser.add_argument("--splits", default="train,val,test", help="split lists to convert, comma-separated")
    parser.add_argument("--overwrite", action="store_true", help="replace the splits and data.yaml already in DST")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    args = parser.parse_args(argv)

    def check() -> Conversion:
        classes, splits = name_list(args.classes, "--classes"), name_list(args.splits, "--splits")
        return plan_conversion(args.src, args.dst, classes, splits, args.overwrite)

    return run_guarded(prog, check, write_conversion, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
