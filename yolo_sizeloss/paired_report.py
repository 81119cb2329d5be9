"""The comparison of evaluated runs as Markdown (val ``--compare``): the reports side by side, each
run's box fit and confidence, and the paired bootstrap differences of ``yolo_sizeloss.paired``.

Entry points: ``compare_report`` (the whole comparison of report folders), ``format_differences``
and ``difference_cell`` (``paired_bootstrap``'s result as a table and as one cell).
"""

from __future__ import annotations

import json
from pathlib import Path

from yolo_sizeloss.checks import DataError, one_line
from yolo_sizeloss.detections_file import DETECTIONS_FILE, RunDetections, find_detections, load_detections, report_file
from yolo_sizeloss.evaluation import COCO_MAX_DET, fit_by_size, frame_scales
from yolo_sizeloss.paired import UnpairedRuns, align_runs, key_metrics, paired_bootstrap
from yolo_sizeloss.report import FIT_COLUMNS, FIT_PROTOCOL, bucket_labels, fit_rows, format_value, markdown_table


REPORT_KEYS = ("coco", "per_class", "recall_by_size", "meta")  # what a comparison reads of a metrics.json


def load_metrics(path: str | Path) -> dict:
    """A report's metrics: ``path`` is a metrics.json or a val output folder containing one."""
    file = report_file(path, "metrics.json")
    if not file.is_file():
        raise FileNotFoundError(f"no metrics.json at {path}")
    try:
        metrics = json.loads(file.read_text())
    except (ValueError, OSError) as e:
        raise DataError(f"{file}: not a val report ({one_line(e)})") from e
    missing = [key for key in REPORT_KEYS if not isinstance(metrics, dict) or key not in metrics]
    if missing:
        raise DataError(f"{file}: not a val report (no {', '.join(missing)})")
    return metrics


def report_folder(path: str | Path) -> Path:
    """The val output folder of a report given as the folder or its metrics.json."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def compare_report(paths: list[str | Path], bootstrap: int = 1000, seed: int = 0, group: str | None = None) -> str:
    """Markdown: ``key_metrics`` of each run with the delta to the first run in brackets; then, when
    every report has its detections file and ``bootstrap`` > 0, each run's paired difference to the
    first with its 95% bootstrap interval over ``bootstrap`` draws of the test images (seeded), or of
    the groups of images the regular expression ``group`` names (``paired.image_groups``)."""
    reports = [load_metrics(p) for p in paths]
    runs = [key_metrics(m) for m in reports]
    labels = [_run_label(Path(p)) for p in paths]
    keys = list(dict.fromkeys(k for run in runs for k in run))
    rows = []
    for key in keys:
        base = runs[0].get(key)
        cells = [format_value(base, 4)]
        for run in runs[1:]:
            value = run.get(key)
            delta = "" if value is None or base is None else f" ({value - base:+.4f})"
            cells.append(format_value(value, 4) + delta)
        rows.append([key] + cells)
    text = markdown_table(["metric"] + labels, rows) + "\n" + settings_note(reports, labels)
    text += data_note(reports, labels)
    missing = [str(p) for p in paths if find_detections(report_folder(p)) is None]
    if missing:
        return text + (f"\nNo box fit table and no paired bootstrap: no {DETECTIONS_FILE} in {', '.join(missing)}; "
                       f"evaluate those runs again with val to write it.\n")
    meta = reports[0]["meta"]
    runs_detections = [load_detections(report_folder(p)) for p in paths]
    text += "\n" + format_fit(runs_detections, labels, meta)
    if len(paths) < 2 or bootstrap <= 0:
        return text
    # the side-by-side tables above stand without pairing; say which run cannot be paired, and why
    unpaired = []
    for run, label in zip(runs_detections[1:], labels[1:]):
        try:
            align_runs([runs_detections[0], run])
        except UnpairedRuns as e:
            unpaired.append(f"{label}: {e}")
    if unpaired:
        return text + f"\nNo paired bootstrap against {labels[0]}: {'; '.join(unpaired)}.\n"
    try:
        differences = bootstrap_as_reported(reports[0], runs_detections, bootstrap, seed, group)
    except ValueError as e:  # --group names no group for an image: the pattern and the data disagree
        raise DataError(one_line(e)) from e
    text += "\n" + format_differences(differences, labels[1:], labels[0], bootstrap, seed, group)
    return text + unreproduced_note(unreproduced(reports, differences, labels))


def bootstrap_as_reported(report: dict, runs: list[RunDetections], resamples: int, seed: int,
                          group: str | None = None) -> list[dict[str, dict]]:
    """``paired_bootstrap`` of ``runs`` in the size buckets, frame, recall thresholds and max-det of
    ``report`` (the first run's metrics.json), so that its full-set values are the report's own;
    ``group`` draws groups of images (``paired.image_groups``)."""
    meta = report["meta"]
    return paired_bootstrap(  # a report without max_det was evaluated at COCO's 100
        runs, tuple(float(e) for e in meta["size_buckets"]), resamples, seed, meta["recall_frame"],
        tuple(float(t) for t in report["recall_by_size"]), meta.get("max_det", COCO_MAX_DET), group,
    )


COMPARED_SETTINGS = ("split", "imgsz", "size_buckets", "recall_frame", "max_det")
# a faithful detections file gives back the report's figures as the report keeps them, to 6 decimals
REPRODUCED_TOLERANCE = 1e-6


def unreproduced(reports: list[dict], differences: list[dict[str, dict]], labels: list[str]) -> list[str]:
    """The runs whose detections file does not give back their report's own figures, each with its largest
    gap: a file written before val kept the detections' full precision (scores to 1e-4, boxes to 1e-2), or one
    replaced since. ``differences`` is ``bootstrap_as_reported``'s for ``reports[1:]`` against ``reports[0]``;
    a report evaluated in other settings than the first is not checked, the bootstrap recomputing it in the
    first's."""
    full = [{key: d["a"] for key, d in differences[0].items()}]
    full += [{key: d["b"] for key, d in run.items()} for run in differences]
    found = []
    for report, values, label in zip(reports, full, labels, strict=True):
        if any(report["meta"].get(k) != reports[0]["meta"].get(k) for k in COMPARED_SETTINGS):
            continue
        reported = key_metrics(report)
        gaps = [(abs(v - reported[k]), k) for k, v in values.items() if v is not None and reported.get(k) is not None]
        gap, key = max(gaps, default=(0.0, ""))
        if gap > REPRODUCED_TOLERANCE:
            found.append(f"{label} ({key} {reported[key]:.4f} in its report, {values[key]:.4f} from its file)")
    return found


def unreproduced_note(runs: list[str]) -> str:
    """A note naming ``unreproduced``'s runs (empty when none): the paired figures are their files'."""
    if not runs:
        return ""
    return (f"\nThe detections files of {'; '.join(runs)} do not give back their reports' figures (a file written "
            "before val kept full precision, or replaced since): the paired differences and intervals are recomputed "
            "from those files and can differ from the reports' figures by a detection or so.\n")


def settings_note(reports: list[dict], labels: list[str]) -> str:
    """A note naming the evaluation settings in which the reports differ (empty when none): the
    table above holds each report's own values, the tables below recompute every run in the first
    report's buckets, frame and maxDets."""
    differ = []
    for key in COMPARED_SETTINGS:
        values = [report["meta"].get(key) for report in reports]
        if len({json.dumps(v) for v in values}) > 1:
            differ.append(f"{key} ({', '.join(f'{label}: {v}' for label, v in zip(labels, values))})")
    if not differ:
        return ""
    return (f"\nThe reports were evaluated with different {'; '.join(differ)}: each report's own values above; "
            f"the tables below take the first report's buckets, frame and maxDets for every run.\n")


def data_note(reports: list[dict], labels: list[str]) -> str:
    """A note naming the data yamls when the reports were evaluated with different ones (empty when
    not, or when a report does not say): runs are paired by image file name and ground truth, which
    two data sets can share."""
    data = [report["meta"].get("data") for report in reports]
    if None in data or len(set(data)) == 1:
        return ""
    named = ", ".join(f"{label}: {d}" for label, d in zip(labels, data))
    return (f"\nThe reports were evaluated with different data yamls ({named}): the tables below pair their "
            f"images by file name, which holds only where the same name is the same image.\n")


def format_fit(runs: list[RunDetections], labels: list[str], meta: dict) -> str:
    """``fit_by_size`` of each run, computed from its detections in the buckets and frame of the first
    report, as one Markdown table with a row per run and bucket."""
    edges = tuple(float(e) for e in meta["size_buckets"])
    buckets = bucket_labels(meta) + ["all"]
    frame = meta["recall_frame"]
    rows = []
    for run, label in zip(runs, labels):
        rows += fit_rows(fit_by_size(run.records, frame_scales(run.input_scales)[frame], edges), [f"{label}, {bucket}" for bucket in buckets])
    table = markdown_table(["run, bucket"] + FIT_COLUMNS, rows)
    return f"Box fit and confidence by size ({frame} frame)\n\n{table}\n\n{FIT_PROTOCOL}\n"


def format_differences(differences: list[dict[str, dict]], labels: list[str], base: str, resamples: int, seed: int,
                       group: str | None = None) -> str:
    """Markdown table of ``paired_bootstrap``'s result: ``diff [low, high]`` per metric and run, ``*``
    where the interval excludes 0."""
    keys = list(differences[0])
    rows = [[key] + [difference_cell(d[key]) for d in differences] for key in keys]
    header = f"Paired difference to {base} (run - {base}) on the same test images, 95% bootstrap interval"
    drawn = "the images" if group is None else f"the groups of images --group {group!r} names"
    note = (f"{resamples} draws of {drawn} with replacement, seed {seed}, metrics recomputed from each run's "
            "detections file; * = the interval excludes 0.")
    return f"{header}\n\n{markdown_table(['metric'] + labels, rows)}\n\n{note}\n"


def difference_cell(entry: dict, scale: float = 1.0, digits: int = 4) -> str:
    """``+0.0123 [+0.0040, +0.0210] *`` (scaled, ``*`` when the interval excludes 0), ``n/a`` if undefined."""
    if entry["diff"] is None:
        return "n/a"
    if entry["low"] is None:
        return f"{scale * entry['diff']:+.{digits}f}"
    star = " *" if entry["excludes_zero"] else ""
    return (f"{scale * entry['diff']:+.{digits}f} [{scale * entry['low']:+.{digits}f}, "
            f"{scale * entry['high']:+.{digits}f}]{star}")


def _run_label(path: Path) -> str:
    """A run's column title: its folder's name, or for a report file ``FOLDER/FILE`` (``exp/metrics.json``)."""
    return path.name if path.is_dir() else f"{path.parent.name}/{path.name}"
