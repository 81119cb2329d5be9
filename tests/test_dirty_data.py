"""A split with broken files counts exactly the images and boxes Ultralytics' stock validator counts."""

import re
from pathlib import Path

import numpy as np
import pytest
from ultralytics.models.yolo.detect import DetectionValidator

from yolo_sizeloss.detections import SkippedLabels, check_split, load_split, skipped_summary

from conftest import make_subset

CHECKPOINT = Path(__file__).resolve().parent / "assets" / "yolov8n_bccd_baseline.pt"


def edit_rows(label: Path, edit) -> None:
    rows = label.read_text().splitlines()
    label.write_text("".join(f"{row}\n" for row in edit(rows)))


def set_value(row: str, column: int, value: str) -> str:
    values = row.split()
    values[column] = value
    return " ".join(values)


def make_dirty_split(root: Path) -> Path:
    """The first 8 BCCD test images (18, 19, 16, 13, 22, 17, 19 and 24 boxes), four of them broken,
    two with values just inside Ultralytics' 1% tolerance; returns the data yaml."""
    data_yaml = make_subset(root, {"train": 1, "val": 1, "test": 8})
    images, labels = root / "images" / "test", root / "labels" / "test"
    truncated = images / "BloodImage_00007.jpg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    edit_rows(labels / "BloodImage_00011.txt", lambda rows: [set_value(rows[0], 1, "1.2"), *rows[1:]])
    edit_rows(labels / "BloodImage_00015.txt", lambda rows: [*rows[:-1], set_value(rows[-1], 2, "-0.05")])
    edit_rows(labels / "BloodImage_00016.txt", lambda rows: [rows[0], *rows])  # 13 rows + 1 duplicate
    edit_rows(labels / "BloodImage_00018.txt", lambda rows: [set_value(rows[0], 3, "1.005"), *rows[1:]])
    edit_rows(labels / "BloodImage_00019.txt", lambda rows: [set_value(rows[0], 1, "-0.005"), *rows[1:]])
    return data_yaml


@pytest.fixture
def dirty_split(tmp_path) -> Path:
    return make_dirty_split(tmp_path)


def test_check_split_skips_what_the_stock_validator_skips_and_says_why(dirty_split, capfd):
    records, data, skipped = check_split(dirty_split, "test")
    root = dirty_split.parent / "images" / "test"
    images = len(list(root.iterdir()))
    assert re.search(rf"checking test labels: 100%.* {images}/{images} ", capfd.readouterr().out)  # as it reads them
    assert [(Path(s.file).name, s.boxes, s.whole_image) for s in skipped] == [
        ("BloodImage_00007.jpg", 18, True),
        ("BloodImage_00011.jpg", 19, True),
        ("BloodImage_00015.jpg", 16, True),
        ("BloodImage_00016.jpg", 1, False),
    ]
    labels = dirty_split.parent / "labels" / "test"
    assert skipped[0].reason.startswith("ignoring corrupt image/label: ")  # the image: no row to name
    row = (labels / "BloodImage_00011.txt").read_text().splitlines()[0]
    assert skipped[1].reason == (f"{labels / 'BloodImage_00011.txt'}:1: {row!r} (coordinates above 1, not normalised to "
                                 "the image size); ignoring corrupt image/label: non-normalized or out of bounds "
                                 "coordinates [1.2]")
    row = (labels / "BloodImage_00015.txt").read_text().splitlines()[15]
    assert skipped[2].reason == (f"{labels / 'BloodImage_00015.txt'}:16: {row!r} (a negative value); ignoring corrupt "
                                 "image/label: negative label values [-0.05]")
    assert skipped[3] == SkippedLabels(str(root / "BloodImage_00016.jpg"), "1 duplicate labels removed", 1, False)
    # 5 images kept, with 13 + 22 + 17 + 19 + 24 = 95 boxes; the two values within 1% of the range count
    assert [Path(r.file).name for r in records] == [
        "BloodImage_00016.jpg", "BloodImage_00018.jpg", "BloodImage_00019.jpg", "BloodImage_00021.jpg",
        "BloodImage_00031.jpg",
    ]
    assert [len(r.gt_boxes) for r in records] == [13, 22, 17, 19, 24]
    assert records[1].gt_boxes[0, 2] - records[1].gt_boxes[0, 0] == pytest.approx(1.005 * 640)
    assert records[2].gt_boxes[0, 0] == pytest.approx(-0.005 * 640 - 0.293750 * 640 / 2)
    assert data["names"] == {0: "RBC", 1: "WBC", 2: "Platelets"}

    assert skipped_summary(skipped, 8) == (
        "3 of 8 images skipped (53 boxes) and 1 duplicate label rows removed, as Ultralytics' "
        f"validator does: BloodImage_00007.jpg: {skipped[0].reason}; BloodImage_00011.jpg: {skipped[1].reason}; "
        f"BloodImage_00015.jpg: {skipped[2].reason}; BloodImage_00016.jpg: 1 duplicate labels removed"
    )
    # load_split, which val.py and the Faster R-CNN path call, returns the same records
    loaded, _ = load_split(dirty_split, "test")
    assert [r.file for r in loaded] == [r.file for r in records]
    assert all(np.array_equal(a.gt_boxes, b.gt_boxes) for a, b in zip(loaded, records))


def test_records_are_exactly_the_images_and_boxes_the_stock_validator_evaluated(dirty_split, tmp_path):
    truncated = dirty_split.parent / "images" / "test" / "BloodImage_00007.jpg"
    truncated_bytes = truncated.read_bytes()
    records, _ = load_split(dirty_split, "test")

    validator = DetectionValidator(args=dict(
        model=str(CHECKPOINT), data=str(dirty_split), split="test", imgsz=160, batch=8, device="cpu",
        workers=0, plots=False, project=str(tmp_path / "runs"), name="val",
    ))
    validator()
    assert validator.seen == len(records) == 5
    assert int(validator.metrics.nt_per_class.sum()) == sum(len(r.gt_boxes) for r in records) == 95
    dataset = validator.dataloader.dataset
    assert [str(Path(f)) for f in dataset.im_files] == [r.file for r in records]
    for label, record in zip(dataset.labels, records):
        height, width = label["shape"]
        xc, yc, w, h = (label["bboxes"] * [width, height, width, height]).T
        stock_xyxy = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], 1)
        np.testing.assert_allclose(record.gt_boxes, stock_xyxy, rtol=1e-6, atol=1e-3)
        assert record.gt_classes.tolist() == label["cls"].ravel().astype(int).tolist()
    assert truncated.read_bytes() == truncated_bytes  # the user's file is as it was


def test_val_names_what_it_skipped_in_one_line(dirty_split, tmp_path, capsys):
    from yolo_sizeloss.validate import main

    assert main(["--model", str(CHECKPOINT), "--data", str(dirty_split), "--split", "test", "--imgsz", "160",
                 "--device", "cpu", "--project", str(tmp_path / "val"), "--name", "dirty"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Skipped")]
    assert len(lines) == 1 and lines[0].startswith("Skipped: 3 of 8 images skipped (53 boxes) and 1 duplicate label")
    assert lines[0].count("Ultralytics' validator") == 1


def test_bad_class_ids_and_short_rows_skip_their_image_as_in_ultralytics(tmp_path):
    data_yaml = make_subset(tmp_path, {"train": 1, "val": 1, "test": 3})
    labels = sorted((tmp_path / "labels" / "test").glob("*.txt"))
    edit_rows(labels[0], lambda rows: [set_value(rows[0], 0, "3"), *rows[1:]])  # 3 names: 0..2
    edit_rows(labels[1], lambda rows: [*rows, "0 0.5 0.5 0.1"])
    records, _, skipped = check_split(data_yaml, "test")
    assert [(Path(s.file).stem, s.boxes, s.whole_image) for s in skipped] == [
        ("BloodImage_00007", 18, True), ("BloodImage_00011", 20, True)]
    row = labels[0].read_text().splitlines()[0]
    assert skipped[0].reason == (
        f"{labels[0]}:1: {row!r} (class 3 is not one of the 3 classes); ignoring corrupt image/label: Label class 3 "
        "exceeds dataset class count 3. Possible class labels are 0-2")
    # numpy's words on the ragged rows follow the row that made them
    assert skipped[1].reason.startswith(f"{labels[1]}:20: '0 0.5 0.5 0.1' (4 columns, not the 5 of class x y w h); "
                                        "ignoring corrupt image/label: ")
    assert [Path(r.file).stem for r in records] == ["BloodImage_00015"]


def test_a_label_row_that_is_not_numbers_is_named_by_file_and_line(tmp_path):
    data_yaml = make_subset(tmp_path, {"train": 1, "val": 1, "test": 2})
    label = sorted((tmp_path / "labels" / "test").glob("*.txt"))[1]
    edit_rows(label, lambda rows: [rows[0], "0 0.5 0.5 abc", *rows[1:]])
    records, _, skipped = check_split(data_yaml, "test")
    assert [(Path(s.file).stem, s.whole_image) for s in skipped] == [(label.stem, True)]
    assert skipped[0].reason.startswith(f"{label}:2: '0 0.5 0.5 abc' (not numbers); ignoring corrupt image/label: ")
    assert len(records) == 1


def test_a_missing_split_folder_is_one_line_naming_the_yaml(tmp_path):
    data_yaml = make_subset(tmp_path, {"train": 1, "val": 1})
    data_yaml.write_text(data_yaml.read_text() + "test: images/nowhere\n")
    with pytest.raises(ValueError) as error:
        check_split(data_yaml, "test")
    assert str(error.value) == f"data yaml {data_yaml}: split 'test': {tmp_path / 'images' / 'nowhere'} does not exist"
