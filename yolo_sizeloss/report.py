"""The readable side of a small-object report: Markdown tables, the size plot, the report folder.

``format_report`` turns ``evaluation.evaluate_records``' metrics into the tables val prints and
writes as metrics.md; ``write_report`` writes metrics.json, metrics.md, size_metrics.png and the
detections file into a report folder, ``write_metrics`` all but the detections file. The tables'
helpers (``markdown_table``, ``format_value``, ``bucket_labels``, ``fit_rows``) serve the comparison
of runs too (``yolo_sizeloss.paired_report``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from yolo_sizeloss.detections_file import DETECTIONS_FILE, RunDetections, write_detections
from yolo_sizeloss.evaluation import COCO_MAX_DET, COCO_NAMES, FIT_FOUND_IOU, FIT_TIGHT_IOU, FRAMES, RECALL_MATCH_IOU


def format_value(x: float | None, digits: int = 3) -> str:
    """A metric for a table: fixed decimals, ``n/a`` for None."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def bucket_labels(meta: dict) -> list[str]:
    """Per bucket ``small (0-32 px)``, or ``16-32 px`` for a custom bucket, from a report's meta."""
    edges = meta["size_buckets"]
    return [
        f"{lo}-{hi} px" if name == f"{lo}-{hi}" else f"{name} ({lo}-{hi} px)"
        for name, lo, hi in zip(meta["bucket_names"], edges, edges[1:])
    ]


def format_report(metrics: dict) -> str:
    """Readable Markdown tables of a report (also the console output)."""
    meta = metrics["meta"]
    frame_label = {"original": "original", "input": f"input ({meta.get('imgsz', '?')} px)"}
    keys = ["ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar100", "ar_small", "ar_medium", "ar_large"]
    ar = f"AR{meta.get('max_det', COCO_MAX_DET)}"  # the key stays 'ar100'; the value is AR at val's --max-det
    header = ["frame", "AP", "AP50", "AP75", "APs", "APm", "APl", ar, "ARs", "ARm", "ARl"]
    sections = [
        f"# Small-object report: {meta.get('model', '?')} on {meta.get('data', '?')} [{meta.get('split', '?')}], "
        f"imgsz {meta.get('imgsz', '?')}, {meta['images']} images",
        "## COCO box metrics (faster-coco-eval, COCO small/medium/large = side < 32 / 32-96 / > 96 px)",
        markdown_table(header, [[frame_label[f]] + [format_value(metrics["coco"][f][k]) for k in keys] for f in FRAMES]),
        f"## AP50-95 / {ar} by size bucket (side length in px of the frame; area = side^2)",
        markdown_table(
            ["bucket"] + [f"AP {frame_label[f]}" for f in FRAMES] + [f"AR {frame_label[f]}" for f in FRAMES],
            [
                [label]
                + [format_value(metrics["coco"][f]["buckets"][name]["ap"]) for f in FRAMES]
                + [format_value(metrics["coco"][f]["buckets"][name]["ar"]) for f in FRAMES]
                for name, label in zip(meta["bucket_names"], bucket_labels(meta))
            ],
        ),
        f"## Per class (AP50-95 and AP50 over all sizes; by size: the {frame_label['input']} frame, then the "
        "original frame)",
        markdown_table(
            ["class", "AP50-95", "AP50", "APs", "APm", "APl", "APs orig", "APm orig", "APl orig"],
            [
                [name, format_value(v["ap"]), format_value(v["ap50"])]
                # a report written before per-size class AP has none: n/a (val --update adds it)
                + [format_value(v.get(frame, {}).get(f"ap_{size}")) for frame in ("input", "original") for size in COCO_NAMES]
                for name, v in metrics["per_class"].items()
            ],
        ),
        f"## Recall % (hits/GT) by size, buckets in the {frame_label[meta['recall_frame']]} frame",
        meta["recall_protocol"],
        markdown_table(
            ["conf >="] + bucket_labels(meta) + ["all"],
            [
                [threshold] + [_recall_cell(row[name]) for name in meta["bucket_names"] + ["all"]]
                for threshold, row in metrics["recall_by_size"].items()
            ],
        ),
    ]
    sections += [
        f"## Box fit and confidence by size, buckets in the {frame_label[meta['recall_frame']]} frame",
        FIT_PROTOCOL,
        markdown_table(["bucket"] + FIT_COLUMNS, fit_rows(metrics["fit_by_size"], bucket_labels(meta) + ["all"])),
    ]
    if metrics.get("ultralytics"):
        ultra = metrics["ultralytics"]
        sections += [
            "## Ultralytics DetectionValidator (stock metrics, original frame)",
            markdown_table(list(ultra), [[format_value(v, 4) for v in ultra.values()]]),
        ]
    return "\n\n".join(sections) + "\n"


FIT_PROTOCOL = (
    f"Per ground truth: its best IoU with any detection of its class (0 without one), and the best score "
    f"among those at IoU >= {FIT_FOUND_IOU} (0 without one); every detection val kept counts. Means over the "
    f"bucket's ground truths; '% with IoU >= {FIT_TIGHT_IOU}' is the share of them with a box that tight."
)


FIT_COLUMNS = ["GT", "mean best IoU", f"% with IoU >= {FIT_TIGHT_IOU}", f"mean score at IoU >= {FIT_FOUND_IOU}"]


def fit_rows(fit: dict, row_labels: list[str]) -> list[list[str]]:
    """``fit_by_size``'s buckets (and ``all``) as table rows under ``FIT_COLUMNS``, labelled in order."""
    return [[label, str(v["total"]), format_value(v["iou"]),
             "n/a" if v["tight"] is None else f"{100 * v['tight']:.1f}", format_value(v["score"])]
            for label, v in zip(row_labels, fit.values(), strict=True)]


def _recall_cell(entry: dict) -> str:
    """``42.83 (221/516)``, or ``n/a (0/0)`` for an empty bucket."""
    percent = "n/a" if entry["recall"] is None else f"{100 * entry['recall']:.2f}"
    return f"{percent} ({entry['hits']}/{entry['total']})"


def plot_size_metrics(metrics: dict, path: Path) -> Path:
    """PNG: left AP50-95 per bucket in both frames, right recall per bucket at each confidence threshold."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend and open figures stay untouched

    meta = metrics["meta"]
    names = meta["bucket_names"]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(12, 3.2 * len(names)), 5.2), layout="constrained")
    ax_ap, ax_rec = fig.subplots(1, 2)

    frame_label = {"original": "original frame", "input": f"input frame ({meta.get('imgsz', '?')} px)"}
    width = 0.8 / len(FRAMES)
    for i, frame in enumerate(FRAMES):
        values = [metrics["coco"][frame]["buckets"][n]["ap"] for n in names]
        bars = ax_ap.bar(x + (i - (len(FRAMES) - 1) / 2) * width, [v or 0 for v in values], width, label=frame_label[frame])
        ax_ap.bar_label(bars, labels=[format_value(v) for v in values], fontsize=9, padding=2)
    ax_ap.set_title("COCO AP50-95 by size bucket")
    ax_ap.set_ylabel("AP50-95")
    ax_ap.set_ylim(0, 1.25)  # headroom above 1.0 keeps the one-row legend off the bars
    ax_ap.set_yticks(np.linspace(0, 1, 6))
    ax_ap.set_xticks(x, [_tick(label) for label in bucket_labels(meta)])
    ax_ap.set_xlabel("size bucket (box side length in the frame)")
    ax_ap.legend(loc="upper center", ncol=len(FRAMES))

    recall = metrics["recall_by_size"]
    width = 0.8 / len(recall)
    for i, (threshold, row) in enumerate(recall.items()):
        values = [row[n]["recall"] for n in names]
        offset = (i - (len(recall) - 1) / 2) * width
        bars = ax_rec.bar(x + offset, [100 * (v or 0) for v in values], width, label=f"conf >= {threshold}")
        ax_rec.bar_label(bars, labels=["n/a" if v is None else f"{100 * v:.1f}" for v in values], fontsize=9, padding=2)
    first = next(iter(recall.values()))
    ax_rec.set_title(f"Recall by size bucket ({meta['recall_frame']} frame, IoU >= {RECALL_MATCH_IOU})")
    ax_rec.set_ylabel("recall (%)")
    ax_rec.set_ylim(0, 125)
    ax_rec.set_yticks(np.linspace(0, 100, 6))
    ax_rec.set_xticks(x, [f"{_tick(label)}\nn={first[n]['total']}" for label, n in zip(bucket_labels(meta), names)])
    ax_rec.set_xlabel(f"size bucket ({meta['recall_frame']} frame), number of ground truths")
    ax_rec.legend(loc="upper center", ncol=len(recall))

    title = f"{Path(meta.get('model', '')).name} on {Path(meta.get('data', '')).name} [{meta.get('split', '')}]"
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def _tick(label: str) -> str:
    """A bucket label on two lines for an axis tick: name, then the side-length range."""
    return label.replace(" (", "\n(")


def write_report(metrics: dict, save_dir: Path, run: RunDetections) -> list[Path]:
    """Write ``write_metrics``' files and the per-image detections file ``DETECTIONS_FILE`` (which a
    later paired comparison of runs needs) into ``save_dir``; return their paths."""
    return [*write_metrics(metrics, save_dir), write_detections(Path(save_dir) / DETECTIONS_FILE, run)]


def write_metrics(metrics: dict, save_dir: Path) -> list[Path]:
    """Write ``metrics.json``, ``metrics.md`` and ``size_metrics.png`` into ``save_dir``; return their paths."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = save_dir / "metrics.json", save_dir / "metrics.md"
    json_path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    md_path.write_text(format_report(metrics))
    return [json_path, md_path, plot_size_metrics(metrics, save_dir / "size_metrics.png")]
