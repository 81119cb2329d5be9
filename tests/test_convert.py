"""The VOC -> YOLO converter, on the shipped BCCD source and on malformed inputs written here."""

import shutil
from pathlib import Path

import pytest

from yolo_sizeloss.convert import ConversionError, convert_voc

BCCD_VOC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "BCCD"
SHIPPED = Path(__file__).resolve().parent.parent / "datasets" / "bccd"


def test_bccd_source_converts_with_two_zero_area_boxes_dropped(tmp_path):
    if not BCCD_VOC.is_dir():
        pytest.skip(f"BCCD VOC source not at {BCCD_VOC}")
    log = []
    summary = convert_voc(BCCD_VOC, tmp_path, log=log.append)
    assert summary.images == {"train": 205, "val": 87, "test": 72}
    assert (summary.kept, summary.dropped, summary.clipped) == (4886, 2, 0)
    assert summary.per_class == {"RBC": 4153, "WBC": 372, "Platelets": 361}
    dropped = [line for line in log if "dropped" in line and line.startswith("WARNING")]
    assert len(dropped) == 2
    assert any("BloodImage_00338" in line for line in dropped) and any("BloodImage_00343" in line for line in dropped)
    lines = [ln for f in tmp_path.glob("labels/*/*.txt") for ln in f.read_text().splitlines()]
    assert len(lines) == 4886
    for ln in lines:
        values = ln.split()
        assert len(values) == 5 and values[0] in {"0", "1", "2"}
        assert all(0.0 < float(v) <= 1.0 for v in values[1:])
    # the copy shipped in datasets/bccd is this conversion
    for split in ("train", "val", "test"):
        ours = sorted(p.name for p in (tmp_path / "labels" / split).glob("*.txt"))
        assert ours == sorted(p.name for p in (SHIPPED / "labels" / split).glob("*.txt"))
        for name in ours:
            assert (tmp_path / "labels" / split / name).read_text() == (SHIPPED / "labels" / split / name).read_text()


def write_voc(root: Path, objects: list[tuple[str, int, int, int, int]], stem="img", size=(100, 80), xml=None):
    """A one-image VOC tree with the given objects (name, xmin, ymin, xmax, ymax)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    body = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>"
        for n, a, b, c, d in objects
    )
    text = xml or f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>{body}</annotation>"
    (root / "Annotations" / f"{stem}.xml").write_text(text)
    shutil.copy(next((SHIPPED / "images" / "test").glob("*.jpg")), root / "JPEGImages" / f"{stem}.jpg")
    (root / "ImageSets" / "Main" / "train.txt").write_text(f"{stem}\n")
    return root


def convert(root: Path, tmp_path: Path):
    log = []
    summary = convert_voc(root, tmp_path / "out", splits=("train",), log=log.append)
    return summary, log, (tmp_path / "out" / "labels" / "train" / "img.txt").read_text().splitlines()


def test_zero_area_and_inverted_boxes_are_dropped_with_a_warning(tmp_path):
    root = write_voc(tmp_path / "voc", [("RBC", 10, 10, 10, 10), ("WBC", 50, 40, 20, 10), ("RBC", 0, 0, 50, 40)])
    summary, log, lines = convert(root, tmp_path)
    assert (summary.kept, summary.dropped, summary.clipped) == (1, 2, 0)
    assert sum("zero-area or inverted, dropped" in line and "img.xml" in line for line in log) == 2
    assert lines == ["0 0.250000 0.250000 0.500000 0.500000"]
    assert "dropped: 2" in log[-1]


def test_box_past_the_border_is_clipped_with_a_warning(tmp_path):
    root = write_voc(tmp_path / "voc", [("Platelets", -10, 60, 40, 100)])
    summary, log, lines = convert(root, tmp_path)
    assert (summary.kept, summary.clipped) == (1, 1)
    assert any("outside the 100x80 image, clipped" in line for line in log)
    assert lines == ["2 0.200000 0.875000 0.400000 0.250000"]  # x 0..40, y 60..80


def test_unknown_class_is_an_error_naming_file_and_object(tmp_path):
    root = write_voc(tmp_path / "voc", [("RBC", 0, 0, 5, 5), ("Neutrophil", 0, 0, 5, 5)])
    with pytest.raises(ConversionError, match=r"img\.xml: object 1: unknown class 'Neutrophil'"):
        convert_voc(root, tmp_path / "out", splits=("train",), log=lambda s: None)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_broken_xml_is_an_error_naming_the_file(tmp_path):
    root = write_voc(tmp_path / "voc", [], xml="<annotation><size><width>10</width>")
    with pytest.raises(ConversionError, match=r"img\.xml: unreadable XML"):
        convert_voc(root, tmp_path / "out", splits=("train",), log=lambda s: None)


def test_missing_image_is_an_error(tmp_path):
    root = write_voc(tmp_path / "voc", [("RBC", 0, 0, 5, 5)])
    (root / "JPEGImages" / "img.jpg").unlink()
    with pytest.raises(ConversionError, match=r"img\.xml: image img\.\* not found"):
        convert_voc(root, tmp_path / "out", splits=("train",), log=lambda s: None)


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    import subprocess
    import sys

    root = write_voc(tmp_path / "voc", [("Neutrophil", 0, 0, 5, 5)])
    run = subprocess.run(
        [sys.executable, "-m", "yolo_sizeloss.convert", str(root), str(tmp_path / "out"), "--splits", "train"],
        capture_output=True, text=True,
    )
    assert run.returncode == 1
    assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr and "Neutrophil" in run.stderr
