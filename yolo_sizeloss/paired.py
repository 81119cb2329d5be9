"""Comparing evaluated runs: side by side, and paired differences with bootstrap confidence intervals.

Two runs evaluated on the same test images differ partly by chance: which images happen to be in
the test split. The paired bootstrap (Efron & Tibshirani, ch. 13) measures that: draw the test
images with replacement, recompute *both* runs' metrics on the same draw, take the difference; over
many draws the 2.5 and 97.5 percentiles of the difference are a 95% interval. An interval that
excludes 0 says the difference would very probably survive another test set of the same kind; it
says nothing about another training seed (``t_interval`` over seeds does).

Speed: COCO matching is per image (a detection only matches ground truth of its own image), so each
run's per-image matching is computed once per frame with faster-coco-eval and only its accumulation
(sorting detections by score over the drawn images, precision at 101 recall points) is redone per
draw, on the drawn images' evaluations, which is exactly what faster-coco-eval computes for a data
set holding the drawn images as distinct images (an image drawn twice counts twice). Overall,
per-size and per-class AP are read from that accumulation's precision array as COCO's summary does.

Entry points: ``paired_bootstrap`` (differences of runs to the first), ``key_metrics`` (the compared
values of a report), ``t_interval`` (over seeds). Their tables and val's ``--compare`` are
``yolo_sizeloss.paired_report``.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import sys
from pathlib import Path

import faster_coco_eval.faster_eval_api_cpp as coco_cpp
import numpy as np
from faster_coco_eval import COCOeval_faster
from ultralytics.utils import TQDM

from yolo_sizeloss.detections_file import RunDetections
from yolo_sizeloss.evaluation import (
    COCO_EDGES,
    COCO_MAX_DET,
    COCO_NAMES,
    FRAMES,
    RECALL_THRESHOLDS,
    bucket_names,
    check_faster_coco_eval,
    coco_area_ranges,
    found_ground_truth,
    frame_scales,
    gt_size_buckets,
    load_coco,
    silent,
)

CONFIDENCE = 0.95
# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (scipy is not a dependency)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


# ---------------------------------------------------------------------------------- metric names
def metric_paths(
    names: list[str], recall_bucket: str, thresholds: tuple[float, ...] = RECALL_THRESHOLDS
) -> dict[str, tuple[str, ...]]:
    """The compared metrics in table order: name -> path into a report (metrics.json). AP and AP50
    over all sizes are the same in both frames (a frame only moves objects between size buckets), so
    they appear once; per class, AP per size in the input frame, then in the original frame."""
    paths = {"coco.ap": ("coco", "original", "ap"), "coco.ap50": ("coco", "original", "ap50")}
    for frame in FRAMES:
        for size in COCO_NAMES:
            paths[f"coco.{frame}.ap_{size}"] = ("coco", frame, f"ap_{size}")
    for name in names:
        paths[f"per_class.{name}.ap"] = ("per_class", name, "ap")
    for frame in ("input", "original"):
        for name in names:
            for size in COCO_NAMES:
                paths[f"per_class.{name}.{frame}.ap_{size}"] = ("per_class", name, frame, f"ap_{size}")
    for t in thresholds:
        paths[f"recall.{recall_bucket}@{t:g}"] = ("recall_by_size", f"{t:g}", recall_bucket, "recall")
    return paths


def key_metrics(metrics: dict) -> dict[str, float | None]:
    """A report's values of ``metric_paths``, then Ultralytics' mAP50-95 when the report has it."""
    thresholds = tuple(float(t) for t in metrics["recall_by_size"])
    paths = metric_paths(list(metrics["per_class"]), metrics["meta"]["bucket_names"][0], thresholds)
    paths["ultralytics.mAP50-95"] = ("ultralytics", "mAP50-95")
    values = {key: dig(metrics, path) for key, path in paths.items()}
    if values["ultralytics.mAP50-95"] is None:
        del values["ultralytics.mAP50-95"]
    return values


def dig(tree: dict, path: tuple[str, ...]):
    """The value at ``path`` in nested dicts, None where the path ends early."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


# ------------------------------------------------------------------------------- per-run matching
class RunEvaluation:
    """One run's per-image COCO matching (once per frame) and per-image small-object recall counts,
    from which ``metrics`` recomputes every compared metric on any draw of the images."""

    def __init__(self, run: RunDetections, edges: tuple[float, ...], recall_frame: str, thresholds: tuple[float, ...],
                 max_det: int = COCO_MAX_DET):
        check_faster_coco_eval()  # _match reads its private per-image evaluations
        self.names = list(run.names)
        self.max_det = max_det  # COCO's maxDets for AP, as the report was evaluated (val --max-det)
        self.images = len(run.records)
        scales = frame_scales(run.input_scales)
        # 'all' and COCO's small/medium/large whatever the report's own buckets; 'all' is the same in
        # both frames (scaling moves objects between sizes only), so the input frame skips it
        ranges, labels = coco_area_ranges(COCO_EDGES)
        self.frames = {
            "original": self._match(run, scales["original"], ranges, labels),
            "input": self._match(run, scales["input"], ranges[1:], labels[1:]),
        }
        self.recall_bucket = bucket_names(edges)[0]
        self.thresholds = thresholds
        small = [gt_size_buckets([r], [s], edges) == 0 for r, s in zip(run.records, scales[recall_frame])]
        self.small_total = np.array([m.sum() for m in small], dtype=np.int64)
        self.small_hits = np.array(
            [[(found_ground_truth(r, t) & m).sum() for r, m in zip(run.records, small)] for t in thresholds],
            dtype=np.int64,
        )  # (thresholds, images)

    def _match(self, run: RunDetections, scales: np.ndarray, ranges: list, labels: list[str]) -> tuple:
        """faster-coco-eval's per-image evaluations in the frame of ``scales`` (class-major, then area
        range, then image) and the parameters its accumulation needs."""
        evaluator = COCOeval_faster(
            *load_coco(run.records, len(self.names), scales), iouType="bbox", print_function=silent, separate_eval=True
        )
        evaluator.params.areaRng, evaluator.params.areaRngLbl = ranges, labels
        evaluator.params.maxDets = [self.max_det]
        evaluator.evaluate()
        return evaluator._paramsEval, evaluator._evalImgs_cpp

    def precision(self, frame: str, draw: np.ndarray) -> np.ndarray:
        """COCO's precision array [IoU, recall, class, area range] accumulated over the images ``draw``
        (indices, repeats allowed: each repeat is one more image)."""
        params, evaluations = self.frames[frame]
        params = copy.copy(params)
        params.imgIds = list(range(len(draw)))  # accumulation reads only the number of images
        classes, areas = len(self.names), len(params.areaRng)
        drawn = [
            evaluations[(k * areas + a) * self.images + i] for k in range(classes) for a in range(areas) for i in draw
        ]
        return coco_cpp.COCOevalAccumulate(params, drawn)["precision"][..., 0]

    def metrics(self, draw: np.ndarray) -> np.ndarray:
        """Every ``metric_paths`` value on the images ``draw``, NaN where undefined (no ground truth)."""
        original, input_ = self.precision("original", draw), self.precision("input", draw)  # [..., area]
        values = [mean_precision(original[..., 0]), mean_precision(original[:1, ..., 0])]
        values += [mean_precision(original[..., a]) for a in range(1, 1 + len(COCO_NAMES))]
        values += [mean_precision(input_[..., a]) for a in range(len(COCO_NAMES))]
        values += [mean_precision(original[:, :, k, 0]) for k in range(len(self.names))]
        values += [mean_precision(input_[:, :, k, a]) for k in range(len(self.names)) for a in range(len(COCO_NAMES))]
        values += [mean_precision(original[:, :, k, a]) for k in range(len(self.names)) for a in range(1, 1 + len(COCO_NAMES))]
        total = self.small_total[draw].sum()
        values += [hits[draw].sum() / total if total else math.nan for hits in self.small_hits]
        return np.array(values, dtype=np.float64)

    def keys(self) -> list[str]:
        """The names of ``metrics``' values."""
        return list(metric_paths(self.names, self.recall_bucket, self.thresholds))


def mean_precision(precision: np.ndarray) -> float:
    """COCO's AP from a slice of the precision array: the mean of its defined entries (COCO marks a
    category without ground truth -1), NaN when none is defined."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else math.nan


# --------------------------------------------------------------------------------------- bootstrap
class UnpairedRuns(ValueError):
    """Runs that do not hold the same images, classes and ground truth: no paired comparison."""


def align_runs(runs: list[RunDetections]) -> list[RunDetections]:
    """The runs with their images in the first run's order, matched by file name. UnpairedRuns when
    the runs do not hold the same images, classes and ground truth."""
    first = runs[0]
    order = [Path(r.file).name for r in first.records]
    if len(set(order)) != len(order):
        raise UnpairedRuns("two images share a file name; runs cannot be paired by image")
    aligned = [first]
    for run in runs[1:]:
        if list(run.names) != list(first.names):
            raise UnpairedRuns(f"runs have different classes: {first.names} and {run.names}")
        index = {Path(r.file).name: i for i, r in enumerate(run.records)}
        if set(index) != set(order) or len(index) != len(run.records):
            raise UnpairedRuns("runs were evaluated on different images; a paired comparison needs the same ones")
        picked = [index[name] for name in order]
        records = [run.records[i] for i in picked]
        for a, b in zip(first.records, records):
            same = np.array_equal(a.gt_classes, b.gt_classes) and np.allclose(a.gt_boxes, b.gt_boxes, atol=0.011)
            if not same:
                raise UnpairedRuns(f"runs have different ground truth for {Path(a.file).name}")
        aligned.append(RunDetections(records, np.asarray(run.input_scales)[picked], run.names))
    return aligned


MIN_RESAMPLES = 100  # below this the 2.5% tails hold under 3 draws each


def check_resamples(resamples: int, flag: str = "--bootstrap") -> None:
    """0 (no intervals) or enough draws to place a 95% interval; ValueError naming the flag otherwise."""
    if resamples != 0 and resamples < MIN_RESAMPLES:
        raise ValueError(f"{flag} {resamples}: 0 (no intervals) or at least {MIN_RESAMPLES}, "
                         "fewer draws cannot place a 95% interval")


def check_group_pattern(pattern: str | None) -> None:
    """ValueError, one line, for a --group that is not a regular expression (None: no grouping)."""
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--group {pattern!r}: not a regular expression ({e})") from None


def image_groups(records: list, pattern: str) -> list[str]:
    """Each image's group: the first match of the regular expression ``pattern`` in its file name (its
    first parenthesised part if it has one). ValueError naming the first image it does not match."""
    compiled = re.compile(pattern)
    groups = []
    for record in records:
        match = compiled.search(Path(record.file).name)
        if match is None:
            raise ValueError(f"--group {pattern!r} does not match image {Path(record.file).name}")
        groups.append(match.group(1) if compiled.groups else match.group(0))
    return groups


def bootstrap_draws(images: int, resamples: int, seed: int, groups: list[str] | None = None) -> list[np.ndarray]:
    """``resamples`` draws of image indices with replacement (numpy generator seeded with ``seed``): of the
    ``images`` one by one, or, with ``groups`` (each image's group), of the groups, each drawn group
    bringing all its images. Singleton groups in image order draw exactly the images' draws."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return list(rng.integers(0, images, size=(resamples, images)))
    labels = np.array(groups)
    members = [np.flatnonzero(labels == g) for g in dict.fromkeys(groups)]
    picks = rng.integers(0, len(members), size=(resamples, len(members)))
    return [np.concatenate([members[g] for g in pick]) for pick in picks]


def paired_bootstrap(
    runs: list[RunDetections],
    edges: tuple[float, ...] = COCO_EDGES,
    resamples: int = 1000,
    seed: int = 0,
    recall_frame: str = "input",
    thresholds: tuple[float, ...] = RECALL_THRESHOLDS,
    max_det: int = COCO_MAX_DET,
    group: str | None = None,
) -> list[dict[str, dict]]:
    """Differences of ``runs[1:]`` to ``runs[0]`` on the same images, with 95% bootstrap intervals.

    Returns one dict per later run: metric key (``metric_paths``) -> ``{"a", "b", "diff", "low",
    "high", "excludes_zero"}`` with ``a``/``b`` the two runs' values on the full set, ``diff`` = b - a,
    ``low``/``high`` the 2.5/97.5 percentiles of b - a over ``resamples`` draws of the images with
    replacement (numpy generator seeded with ``seed``: the same seed gives the same draws for every
    run), over the draws where the metric is defined; None where it is not defined at all. Small
    recall counts ground truths in the first bucket of ``edges`` in ``recall_frame``; AP is read at
    COCO maxDets ``max_det``, which must be the reports' (``val --max-det``) for the full-set values to
    be theirs. ``group``, a regular expression naming each image's group from its file name
    (``image_groups``), draws groups of images instead (tiles of one image, frames of one video, fields
    of one slide are not independent: drawn one by one, they give intervals too narrow for another set).
    """
    runs = align_runs(runs)
    groups = None if group is None else image_groups(runs[0].records, group)
    evaluations = [RunEvaluation(run, edges, recall_frame, thresholds, max_det) for run in runs]
    everything = np.arange(evaluations[0].images)
    full = [e.metrics(everything) for e in evaluations]
    draws = bootstrap_draws(len(everything), resamples, seed, groups)
    sampled = np.empty((len(runs), resamples, len(full[0])))
    # progress on stderr: stdout carries the tables, which users redirect into files
    bar = TQDM(draws, desc=f"paired bootstrap, {len(runs)} runs", disable=resamples < 100, file=sys.stderr)
    for d, draw in enumerate(bar):
        for r, evaluation in enumerate(evaluations):
            sampled[r, d] = evaluation.metrics(draw)
    keys = evaluations[0].keys()
    return [
        {key: difference(full[0][j], full[r][j], sampled[r, :, j] - sampled[0, :, j]) for j, key in enumerate(keys)}
        for r in range(1, len(runs))
    ]


def difference(a: float, b: float, sampled: np.ndarray) -> dict:
    """One metric's full-set values, their difference b - a and its percentile interval over the
    bootstrap differences ``sampled`` (NaN entries: draws where the metric was undefined)."""
    defined = sampled[~np.isnan(sampled)]
    value = None if math.isnan(a) or math.isnan(b) else b - a
    if value is None or not defined.size:
        return {"a": _none(a), "b": _none(b), "diff": value, "low": None, "high": None, "excludes_zero": False}
    low, high = np.percentile(defined, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return {"a": float(a), "b": float(b), "diff": float(value), "low": float(low), "high": float(high),
            "excludes_zero": bool(low > 0 or high < 0)}


def _none(x: float) -> float | None:
    """NaN (undefined metric) as None, for JSON."""
    return None if math.isnan(x) else float(x)


def t_interval(values: list[float]) -> tuple[float, float, float] | None:
    """Mean of ``values`` (per-seed differences) and its two-sided 95% Student-t interval (``CONFIDENCE``, the
    one ``T_975`` tabulates), ``mean -/+ t(n-1) s / sqrt(n)``; None for fewer than two values. Up to 31 values."""
    n = len(values)
    if n < 2:
        return None
    if n - 1 > len(T_975):
        raise ValueError(f"t table ends at {len(T_975)} degrees of freedom, got {n - 1}")
    mean = statistics.mean(values)
    half = T_975[n - 2] * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half
