"""Derive a one-class data set from a YOLO-format one: the same images, only one class's boxes.

    python bench/one_class.py --data bccd.yaml --keep Platelets --out bench/data/bccd_platelets
    python bench/compare.py --data bench/data/bccd_platelets/data.yaml --losses baseline feedback ...

BCCD's platelets alone are a data set where nearly every object is small (at imgsz 416), the case
where a size-aware weighting has little to rebalance and must cost nothing. Images are linked, not
copied; every image is kept (those without the class become background images). The folder must not
exist yet.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from yolo_sizeloss.checks import DataError, check_data_yaml
from yolo_sizeloss.detections import split_image_files
from yolo_sizeloss.paths import resolve_data

SPLITS = ("train", "val", "test")


def one_class_dataset(data_yaml: str, keep: str, out: Path) -> dict[str, int]:
    """Write ``out`` (images linked, labels filtered to class ``keep`` renumbered 0, a data.yaml);
    return the boxes kept per split."""
    from ultralytics.data.utils import check_det_dataset, img2label_paths

    data = check_det_dataset(resolve_data(data_yaml))
    names = {int(k): v for k, v in data["names"].items()}
    if keep not in names.values():
        raise ValueError(f"{data_yaml}: no class {keep!r} (classes: {', '.join(names.values())})")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    class_id = next(k for k, v in names.items() if v == keep)
    splits = {split: split_image_files(data, split) for split in SPLITS if data.get(split)}
    for split, images in splits.items():  # one flat folder per split: checked before anything is written
        seen = {}
        for image in images:
            other = seen.setdefault(Path(image).stem, image)
            if other != image:
                raise ValueError(f"{data_yaml}: {other} and {image} ({split}) share the name "
                                 f"{Path(image).stem!r}; their labels would collide in one folder")
    kept = {}
    for split, images in splits.items():
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        kept[split] = 0
        for image, label in zip(images, img2label_paths(images)):
            os.symlink(Path(image).resolve(), out / "images" / split / Path(image).name)
            rows = [line.split() for line in Path(label).read_text().splitlines()] if Path(label).is_file() else []
            rows = [["0", *r[1:]] for r in rows if r and int(float(r[0])) == class_id]
            kept[split] += len(rows)
            (out / "labels" / split / f"{Path(image).stem}.txt").write_text("".join(" ".join(r) + "\n" for r in rows))
    (out / "data.yaml").write_text(yaml.safe_dump(
        {"path": str(out.resolve()), **{s: f"images/{s}" for s in kept}, "names": {0: keep}}, sort_keys=False))
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="bccd.yaml")
    p.add_argument("--keep", default="Platelets", help="the class to keep")
    p.add_argument("--out", required=True, help="new folder for the derived data set")
    args = p.parse_args(argv)
    try:
        kept = one_class_dataset(check_data_yaml(args.data), args.keep, Path(args.out))
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # FileNotFoundError: no such data yaml
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # a data yaml found but unusable (its images missing): the data's fault
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}/data.yaml: {args.keep} only, boxes per split {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
