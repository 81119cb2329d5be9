"""The VOC -> YOLO converter, on real BCCD VOC files and on malformed inputs written here."""

import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from yolo_sizeloss.convert import ConversionError, convert_voc, main

from conftest import BCCD as SHIPPED  # the shipped YOLO-format BCCD, this converter's output

BCCD_VOC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "BCCD"  # the full source, if present
BCCD_VOC_FIXTURE = Path(__file__).resolve().parent / "assets" / "bccd_voc"  # 7 of its images, shipped


def assert_labels_as_shipped(out: Path, split: str, stems: list[str] | None = None):
    """The converted labels of ``split`` are datasets/bccd's, file for file (all of them: ``stems`` None)."""
    ours = sorted(p.name for p in (out / "labels" / split).glob("*.txt"))
    expected = sorted(p.name for p in (SHIPPED / "labels" / split).glob("*.txt")) if stems is None else \
        sorted(f"{stem}.txt" for stem in stems)
    assert ours == expected
    for name in ours:
        assert (out / "labels" / split / name).read_text() == (SHIPPED / "labels" / split / name).read_text()


def assert_valid_yolo_lines(out: Path, count: int):
    lines = [ln for f in out.glob("labels/*/*.txt") for ln in f.read_text().splitlines()]
    assert len(lines) == count
    for ln in lines:
        values = ln.split()
        assert len(values) == 5 and values[0] in {"0", "1", "2"}
        assert all(0.0 < float(v) <= 1.0 for v in values[1:])


def convert_bccd(src: Path, out: Path, images: dict, kept: int, per_class: dict) -> list[str]:
    """Convert real BCCD VOC files; check the summary (two zero-area boxes dropped, nothing clipped) and
    every label line; return the two drop warnings."""
    log = []
    summary = convert_voc(src, out, log=log.append)
    assert summary.images == images
    assert (summary.kept, summary.dropped, summary.clipped) == (kept, 2, 0)
    assert summary.per_class == per_class
    assert_valid_yolo_lines(out, kept)
    dropped = [line for line in log if "dropped" in line and line.startswith("WARNING")]
    assert len(dropped) == 2
    return dropped


def test_bccd_fixture_converts_with_the_two_zero_area_boxes_dropped(tmp_path):
    """Seven real BCCD VOC files (tests/assets/bccd_voc), among them the two with a zero-area box."""
    # 119 <object>s in the seven XML files, two of them the zero-area RBCs
    dropped = convert_bccd(BCCD_VOC_FIXTURE, tmp_path, {"train": 3, "val": 2, "test": 2}, 117,
                           {"RBC": 106, "WBC": 7, "Platelets": 4})
    assert "BloodImage_00338.xml: object 12 (RBC) box [504, 337, 504, 337]: zero-area or inverted, dropped" in dropped[1]
    assert "BloodImage_00343.xml: object 3 (RBC) box [181, 329, 181, 329]: zero-area or inverted, dropped" in dropped[0]
    for split in ("train", "val", "test"):
        stems = (BCCD_VOC_FIXTURE / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert_labels_as_shipped(tmp_path, split, stems)
        assert sorted(p.name for p in (tmp_path / "images" / split).iterdir()) == [f"{s}.jpg" for s in sorted(stems)]
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    assert data == {"path": str(tmp_path.resolve()), "train": "images/train", "val": "images/val",
                    "test": "images/test", "names": {0: "RBC", 1: "WBC", 2: "Platelets"}}


def test_bccd_full_source_converts_to_the_shipped_data_set(tmp_path):
    """The whole VOC source (outside the checkout) converts to datasets/bccd exactly."""
    if not BCCD_VOC.is_dir():
        pytest.skip(f"BCCD VOC source not at {BCCD_VOC} (the fixture test covers a part of it)")
    dropped = convert_bccd(BCCD_VOC, tmp_path, {"train": 205, "val": 87, "test": 72}, 4886,
                           {"RBC": 4153, "WBC": 372, "Platelets": 361})
    assert any("BloodImage_00338" in line for line in dropped) and any("BloodImage_00343" in line for line in dropped)
    for split in ("train", "val", "test"):
        assert_labels_as_shipped(tmp_path, split)


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
    pixels = size if all(isinstance(v, int) for v in size) else (100, 80)  # the size the XML says, where it is one
    Image.new("RGB", pixels, (200, 120, 140)).save(root / "JPEGImages" / f"{stem}.jpg")
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


def test_an_annotation_listed_in_two_splits_warns_once(tmp_path):
    root = write_voc(tmp_path / "voc", [("Platelets", -10, 60, 40, 100)])
    (root / "ImageSets" / "Main" / "val.txt").write_text("img\n")
    log = []
    convert_voc(root, tmp_path / "out", splits=("train", "val"), log=log.append)
    assert sum("clipped" in line and line.startswith("WARNING") for line in log) == 1
    assert (tmp_path / "out" / "labels" / "val" / "img.txt").is_file()


def test_unknown_class_is_an_error_naming_file_and_object(tmp_path):
    root = write_voc(tmp_path / "voc", [("RBC", 0, 0, 5, 5), ("Neutrophil", 0, 0, 5, 5)])
    with pytest.raises(ConversionError, match=r"img\.xml: object 1: unknown class 'Neutrophil' \(not in --classes: RBC, WBC, "
                                              r"Platelets; its default is BCCD's\)"):
        convert_voc(root, tmp_path / "out", splits=("train",), log=lambda s: None)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_broken_xml_is_an_error_naming_the_file(tmp_path):
    root = write_voc(tmp_path / "voc", [], xml="<annotation><size><width>10</width>")
    with pytest.raises(ConversionError, match=r"img\.xml: unreadable XML"):
        convert_voc(root, tmp_path / "out", splits=("train",), log=lambda s: None)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_coordinate_is_an_error_naming_file_and_object(tmp_path, value):
    root = write_voc(tmp_path / "voc", [("RBC", 0, 0, 5, 5), ("WBC", value, 0, 50, 40)])
    with pytest.raises(ConversionError, match=rf"img\.xml: object 1: <xmin> is '{value}', not a finite number"):
        convert_voc(root, tmp_path / "out", splits=("train",), log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_a_non_finite_image_size_is_an_error(tmp_path):
    root = write_voc(tmp_path / "voc", [("RBC", 0, 0, 5, 5)], size=("nan", 80))
    with pytest.raises(ConversionError, match=r"img\.xml: image size nanx80.0 is not positive and finite"):
        convert_voc(root, tmp_path / "out", splits=("train",), log=lambda s: None)


def test_a_split_list_that_is_not_text_is_one_error_line(tmp_path, capsys):
    root = write_voc(tmp_path / "voc", [("RBC", 0, 0, 5, 5)])
    list_file = root / "ImageSets" / "Main" / "train.txt"
    list_file.write_bytes(b"img\n\xff\xfe\n")
    code, stdout, stderr = run_main([root, tmp_path / "out", "--splits", "train"], capsys)
    assert (code, stdout) == (1, "")
    assert stderr.splitlines() == [
        f"python -m yolo_sizeloss.convert: error: {list_file}: not a text file (invalid start byte at byte 4)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["not an image", "over Pillow's pixel limit"])
def test_an_image_pillow_cannot_open_is_one_error_line_naming_it(tmp_path, capsys, monkeypatch, case):
    root = write_voc(tmp_path / "voc", [("RBC", 0, 0, 5, 5)])
    image = root / "JPEGImages" / "img.jpg"
    if case == "not an image":
        image.write_bytes(b"not a jpeg")
    else:  # a large aerial mosaic: Pillow refuses over twice MAX_IMAGE_PIXELS, with an error that is no OSError
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 80 // 2 - 1)
    code, stdout, stderr = run_main([root, tmp_path / "out", "--splits", "train"], capsys)
    assert (code, stdout) == (1, "")
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m yolo_sizeloss.convert: error: {image}: unreadable image (")
    assert ("decompression bomb" in lines[0]) == (case != "not an image")
    assert not (tmp_path / "out").exists()


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
    assert run.stderr.startswith("python -m yolo_sizeloss.convert: error: ")
    assert "Traceback" not in run.stderr and "Neutrophil" in run.stderr


def write_dataset(out: Path) -> dict[Path, bytes]:
    """A user's YOLO data set in ``out`` (real image, label, cache and yaml); return its files' bytes."""
    image = next((SHIPPED / "images" / "test").glob("*.jpg"))
    files = {
        out / "images" / "train" / "mine.jpg": image.read_bytes(),
        out / "labels" / "train" / "mine.txt": b"0 0.5 0.5 0.1 0.1\n",
        out / "labels" / "train.cache": b"stale cache of the old labels",
        out / "images" / "extra" / "other.jpg": image.read_bytes(),
        out / "data.yaml": b"path: .\ntrain: images/train\nnames: {0: cell}\n",
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_output_holding_a_data_set_is_refused_naming_it_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    files = write_dataset(out)
    code, stdout, stderr = run_main([BCCD_VOC_FIXTURE, out], capsys)
    assert code == 2
    assert stderr.splitlines() == [
        f"python -m yolo_sizeloss.convert: error: {out} already holds images/extra/ (1 files), images/train/ (1 files), labels/train/ (1 files), "
        "labels/train.cache, data.yaml; nothing was written "
        "(--overwrite replaces images/<split>/, labels/<split>/ and data.yaml)"
    ]
    assert stdout == ""
    assert {p: p.read_bytes() for p in files} == files
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        p.relative_to(out).as_posix() for p in files)


def test_overwrite_replaces_the_converted_splits_and_says_what_it_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    files = write_dataset(out)
    code, stdout, stderr = run_main([BCCD_VOC_FIXTURE, out, "--splits", "train", "--overwrite"], capsys)
    assert code == 0 and stderr == ""
    assert stdout.splitlines()[:2] == [
        f"replacing images/train/ (1 files), labels/train/ (1 files), labels/train.cache, data.yaml in {out}",
        f"keeping images/extra/ (1 files) in {out} (not part of this conversion)",
    ]
    stems = (BCCD_VOC_FIXTURE / "ImageSets" / "Main" / "train.txt").read_text().split()
    assert sorted(p.name for p in (out / "images" / "train").iterdir()) == [f"{s}.jpg" for s in stems]
    assert_labels_as_shipped(out, "train", stems)
    assert not (out / "labels" / "train.cache").exists()  # Ultralytics would otherwise reuse the old labels
    assert (out / "images" / "extra" / "other.jpg").read_bytes() == files[out / "images" / "extra" / "other.jpg"]
    assert yaml.safe_load((out / "data.yaml").read_text())["train"] == "images/train"


def test_a_large_conversion_shows_its_progress(tmp_path, capsys, monkeypatch):
    """Reading every annotation and image header, then copying every image, was minutes of silence on a
    VOC-sized set; a small one keeps its output to the summary."""
    from yolo_sizeloss import convert

    stems = (BCCD_VOC_FIXTURE / "ImageSets" / "Main" / "train.txt").read_text().split()
    monkeypatch.setattr(convert, "PROGRESS_FROM", len(stems))  # as if this set were large
    code, stdout, _ = run_main([BCCD_VOC_FIXTURE, tmp_path / "out", "--splits", "train"], capsys)
    assert code == 0
    assert re.search(rf"reading train: 100%.* {len(stems)}/{len(stems)} ", stdout), stdout
    assert re.search(rf"writing: 100%.* {len(stems)}/{len(stems)} ", stdout), stdout


def test_a_write_that_fails_part_way_leaves_the_output_as_it_was(tmp_path, capsys, monkeypatch):
    """--overwrite deleted the old splits before copying the new ones: a full disk part-way lost both."""
    from yolo_sizeloss import convert

    out = tmp_path / "out"
    files = write_dataset(out)
    real, copies = shutil.copy2, []

    def disk_full_at_the_second_image(source, target):
        copies.append(target)
        if len(copies) == 2:
            raise OSError(28, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(convert.shutil, "copy2", disk_full_at_the_second_image)
    code, _, stderr = run_main([BCCD_VOC_FIXTURE, out, "--splits", "train", "--overwrite"], capsys)
    assert code == 1 and stderr.endswith("No space left on device (--verbose shows the traceback)\n")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing replaced, nothing left over
    fresh = tmp_path / "fresh"
    copies.clear()
    assert run_main([BCCD_VOC_FIXTURE, fresh, "--splits", "train"], capsys)[0] == 1
    assert not fresh.exists()


def test_overwriting_one_split_keeps_the_others_in_data_yaml(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main([BCCD_VOC_FIXTURE, out], capsys)[0] == 0
    before = yaml.safe_load((out / "data.yaml").read_text())
    assert run_main([BCCD_VOC_FIXTURE, out, "--splits", "train", "--overwrite"], capsys)[0] == 0
    after = yaml.safe_load((out / "data.yaml").read_text())
    assert after == before and (after["val"], after["test"]) == ("images/val", "images/test")


def test_overwriting_one_split_keeps_a_split_of_another_name_in_data_yaml(tmp_path, capsys):
    voc = tmp_path / "voc"
    shutil.copytree(BCCD_VOC_FIXTURE, voc)
    main_dir = voc / "ImageSets" / "Main"
    (main_dir / "trainval.txt").write_text((main_dir / "train.txt").read_text() + (main_dir / "val.txt").read_text())
    out = tmp_path / "out"
    assert run_main([voc, out, "--splits", "train,val,trainval"], capsys)[0] == 0
    before = yaml.safe_load((out / "data.yaml").read_text())
    assert before["trainval"] == "images/trainval"
    assert run_main([voc, out, "--splits", "train", "--overwrite"], capsys)[0] == 0
    assert yaml.safe_load((out / "data.yaml").read_text()) == before
    # and its labels are held to the class list like train/val/test's
    code, _, stderr = run_main([voc, out, "--splits", "train", "--overwrite", "--classes", "Platelets,RBC,WBC"], capsys)
    assert code == 2 and "the splits kept in place (val, trainval)" in stderr


def test_overwriting_one_split_with_other_classes_is_refused_while_others_are_kept(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main([BCCD_VOC_FIXTURE, out], capsys)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # the same names in another order: the kept splits' ids would name other classes
    code, stdout, stderr = run_main([BCCD_VOC_FIXTURE, out, "--splits", "val", "--overwrite", "--classes",
                                     "Platelets,RBC,WBC"], capsys)
    assert code == 2 and stdout == ""
    assert stderr.splitlines() == [
        f"python -m yolo_sizeloss.convert: error: {out / 'data.yaml'} names ['RBC', 'WBC', 'Platelets'], --classes "
        "['Platelets', 'RBC', 'WBC']: the splits kept in place (train, test) were labelled for the first; convert them too "
        "(--splits) or give the same --classes; nothing was written"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # every split converted again: the new class list applies to all of them
    assert run_main([BCCD_VOC_FIXTURE, out, "--overwrite", "--classes", "Platelets,RBC,WBC"], capsys)[0] == 0
    assert yaml.safe_load((out / "data.yaml").read_text())["names"] == {0: "Platelets", 1: "RBC", 2: "WBC"}


def test_class_list_with_spaces_is_accepted(tmp_path, capsys):
    code, _, stderr = run_main([BCCD_VOC_FIXTURE, tmp_path / "out", "--classes", "RBC, WBC, Platelets",
                                "--splits", "test, val"], capsys)
    assert code == 0 and stderr == ""
    data = yaml.safe_load((tmp_path / "out" / "data.yaml").read_text())
    assert data["names"] == {0: "RBC", 1: "WBC", 2: "Platelets"} and (data["test"], data["val"]) == ("images/test", "images/val")
    assert_labels_as_shipped(tmp_path / "out", "test", ["BloodImage_00007", "BloodImage_00011"])


@pytest.mark.parametrize("case", ["output is a file", "missing source", "empty class name", "repeated class"])
def test_usage_errors_are_one_line_with_exit_2_and_write_nothing(tmp_path, capsys, case):
    out = tmp_path / "out"
    args = {
        "output is a file": [BCCD_VOC_FIXTURE, out],
        "missing source": [tmp_path / "no_such_voc", out],
        "empty class name": [BCCD_VOC_FIXTURE, out, "--classes", "RBC,,Platelets"],
        "repeated class": [BCCD_VOC_FIXTURE, out, "--classes", "RBC, WBC, RBC"],
    }[case]
    if case == "output is a file":
        out.write_text("my notes")
    message = {
        "output is a file": f"python -m yolo_sizeloss.convert: error: {out}: output exists and is not a folder",
        "missing source": f"python -m yolo_sizeloss.convert: error: {tmp_path / 'no_such_voc'}: VOC source folder not found",
        "empty class name": "python -m yolo_sizeloss.convert: error: --classes 'RBC,,Platelets': an empty name (write names separated by single commas)",
        "repeated class": "python -m yolo_sizeloss.convert: error: --classes 'RBC, WBC, RBC': RBC given more than once",
    }[case]
    code, stdout, stderr = run_main(args, capsys)
    assert (code, stdout, stderr.splitlines()) == (2, "", [message])
    assert out.read_text() == "my notes" if case == "output is a file" else not out.exists()


def test_verbose_adds_the_traceback(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("my notes")
    code, _, stderr = run_main([BCCD_VOC_FIXTURE, out, "--verbose"], capsys)
    assert code == 2
    assert stderr.startswith("Traceback") and "UsageError" in stderr
    assert stderr.splitlines()[-1] == f"python -m yolo_sizeloss.convert: error: {out}: output exists and is not a folder"


def test_repeated_names_convert_once_and_an_empty_list_warns(tmp_path):
    root = write_voc(tmp_path / "voc", [("RBC", 0, 0, 5, 5)])
    (root / "ImageSets" / "Main" / "train.txt").write_text("img\nimg\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n")
    log = []
    summary = convert_voc(root, tmp_path / "out", splits=("train", "val"), log=log.append)
    assert summary.images == {"train": 1, "val": 0} and summary.kept == 1
    main_dir = root / "ImageSets" / "Main"
    assert [line for line in log if line.startswith("WARNING")] == [
        f"WARNING {main_dir / 'train.txt'}: 1 repeated name(s), converted once",
        f"WARNING {main_dir / 'val.txt'}: lists no images; the val split is empty",
    ]


def test_a_data_yaml_without_a_val_split_is_named_when_written(tmp_path):
    """Ultralytics' check refuses a data yaml without train or val only when a training starts."""
    root = write_voc(tmp_path / "voc", [("RBC", 0, 0, 5, 5)])
    (root / "ImageSets" / "Main" / "test.txt").write_text("img\n")
    log = []
    convert_voc(root, tmp_path / "out", splits=("train", "test"), log=log.append)
    assert [line for line in log if line.startswith("WARNING")] == [
        f"WARNING {tmp_path / 'out' / 'data.yaml'} lists no val split, which training needs (convert it with --splits, "
        "or edit data.yaml)"]
    assert "val" not in yaml.safe_load((tmp_path / "out" / "data.yaml").read_text())


def test_an_unknown_flag_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(BCCD_VOC_FIXTURE), str(tmp_path / "out"), "--clases", "a"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m yolo_sizeloss.convert: error: unrecognized arguments: --clases a (see --help)"]


def test_overwrite_replaces_a_linked_split_folder_and_leaves_its_target(tmp_path, capsys):
    """rmtree refused the link half-way, after images/test/ was already gone."""
    out = tmp_path / "out"
    assert run_main([BCCD_VOC_FIXTURE, out], capsys)[0] == 0
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "images" / "train", elsewhere)
    (out / "images" / "train").symlink_to(elsewhere, target_is_directory=True)
    kept = sorted(p.name for p in elsewhere.iterdir())
    code, _, stderr = run_main([BCCD_VOC_FIXTURE, out, "--overwrite"], capsys)
    assert code == 0 and stderr == ""
    assert not (out / "images" / "train").is_symlink() and sorted(p.name for p in (out / "images" / "train").iterdir()) == kept
    assert sorted(p.name for p in elsewhere.iterdir()) == kept  # the linked folder is untouched


def test_an_xml_size_other_than_the_images_warns_naming_both(tmp_path):
    """A box is normalised by the frame the XML says it was drawn in; a wrong <size> was silent."""
    root = write_voc(tmp_path / "voc", [("RBC", 10, 10, 50, 40)], size=(100, 80))
    Image.new("RGB", (200, 160)).save(root / "JPEGImages" / "img.jpg")
    summary, _, lines = convert(root, tmp_path)
    assert [w for w in summary.warnings if "img.xml" in w] == [
        f"{root / 'Annotations' / 'img.xml'}: <size> 100x80, but img.jpg is 200x160; boxes normalised by the XML's size"]
    assert lines == ["0 0.300000 0.312500 0.400000 0.375000"]
