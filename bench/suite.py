"""The development suite in one table: each mode's difference to the stock loss on every data set of
bench/suite.yaml, read from that set's bench/compare.py tables, against this project's goal lines.

    python bench/suite.py --modes nwd nwd:safit_sharp_auto_norm
    python bench/suite.py --modes nwd --split val --out bench/results/suite-val.md

A mode is named as compare.py's --losses names it. Over several seeds a cell is the mean paired
difference with its 95% t-interval over seeds; with one seed it is that seed's paired bootstrap interval
over the test images (mAP50-95, Ultralytics' own, has none). A line is met or not on the mean, and where
it asks for an interval above 0, on that interval. The lines (LINES) are the 'Beyond NWD' goal: where
small objects are a minority, the focus class's AP and its own APs (input frame) at least +3 with intervals
above 0 (COCO's APs of all classes is shown beside), APl (original frame) at most 0.5 below stock,
mAP50-95 not lower; where nearly all are small, AP at most 0.5 below stock and small recall at score 0.3
not lower; on a control, AP within 0.5 of stock.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from compare import columns, loss_mode, table_files
from yolo_sizeloss.checks import one_line, output_file_problem
from yolo_sizeloss.config import LossConfigError
from yolo_sizeloss.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
SUITE = Path(__file__).with_name("suite.yaml")
FOCUS = "focus AP"  # the columns of a set's focus class, whatever its name there
FOCUS_SMALL = "focus APs input"
SHOWN = (FOCUS, FOCUS_SMALL, "APs input", "APl orig", "mAP50-95", "AP", "R small@0.3")
# kind -> (column, the least mean difference in points, whether its interval must lie above 0)
LINES = {
    "mixed": ((FOCUS, 3.0, True), (FOCUS_SMALL, 3.0, True), ("APl orig", -0.5, False), ("mAP50-95", 0.0, False)),
    "all_small": (("AP", -0.5, False), ("R small@0.3", 0.0, False)),
    "control": (("AP", -0.5, False),),  # and at most +0.5 above: CONTROL_CEILING
}
CONTROL_CEILING = 0.5
STOCK = "baseline"  # the reference of every set's tables, and the trains_as value of the stock loss


def cell(results: dict, label: str, column: str) -> dict | None:
    """{diff, low, high, seeds} in points of ``label`` against the reference in one set's results.json:
    the t-interval over seeds, or with one seed the paired bootstrap; diff None where the metric is
    undefined on the set (a focus class without small objects); None where the table has no such column
    or mode."""
    if column in (FOCUS, FOCUS_SMALL):
        column = column.replace("focus", results["focus_class"])
    entry = results["differences"].get(label, {}).get(column)
    if entry is None:
        return None
    if entry["diff"] is None:
        return {"diff": None, "low": None, "high": None, "seeds": len(entry["per_seed"])}
    low, high = entry["low"], entry["high"]
    if low is None and len(entry["per_seed"]) == 1:
        (seed,) = entry["per_seed"]
        key = dict(columns(results["focus_class"]))[column]
        boot = results.get("bootstrap", {}).get(label, {}).get(seed, {}).get(key)
        if boot is not None:
            low, high = boot["low"], boot["high"]
    points = [None if v is None else 100 * v for v in (entry["diff"], low, high)]
    return {**dict(zip(("diff", "low", "high"), points)), "seeds": len(entry["per_seed"])}


def failed_lines(kind: str, cells: dict[str, dict | None]) -> list[str]:
    """The lines of ``kind`` that ``cells`` (column -> cell) miss, each as '<column> <what it missed>';
    a column without a value (tables older than the column) misses its line."""
    failed = []
    for column, least, above_zero in LINES[kind]:
        c = cells.get(column)
        if c is None:
            failed.append(f"{column} not tabulated")
        elif c["diff"] is None:
            failed.append(f"{column} undefined here")
        elif c["diff"] < least:
            failed.append(f"{column} {c['diff']:+.1f} < {least:+.1f}")
        elif above_zero and (c["low"] is None or c["low"] <= 0):
            failed.append(f"{column} interval not above 0")
    ap = (cells.get("AP") or {}).get("diff")
    if kind == "control" and ap is not None and ap > CONTROL_CEILING:
        failed.append(f"AP {ap:+.1f} > +{CONTROL_CEILING:.1f}")
    return failed


def cell_text(c: dict | None) -> str:
    """``+5.0 [+2.5, +7.5]`` (no interval where there is none), ``n/a`` for a metric undefined on the
    set; for no cell of a mode that was run, ``not tabulated`` (its set's tables predate the column:
    compare.py --only table makes them anew)."""
    if c is None:
        return "not tabulated"
    if c["diff"] is None:
        return "n/a"
    interval = "" if c["low"] is None else f" [{c['low']:+.1f}, {c['high']:+.1f}]"
    return f"{c['diff']:+.1f}{interval}"


def set_tables(folder: Path, split: str, names: list[str]) -> list[dict]:
    """A set's compare.py tables of ``split`` that exist: results.json, then those named in the set's
    ``tables`` (``--table NAME``: more seeds of some modes, with the same focus class)."""
    paths = [table_files(folder, split, name)[0] for name in (None, *names)]
    return [json.loads(path.read_text()) for path in paths if path.is_file()]


def mode_cells(tables: list[dict], label: str) -> dict[str, dict | None]:
    """``label``'s cells (column -> cell) from the table that holds it over the most seeds; None cells
    where no table has it."""
    best = {column: None for column in SHOWN}
    for results in tables:
        cells = {column: cell(results, label, column) for column in SHOWN}
        if seed_count(cells) > seed_count(best):
            best = cells
    return best


def seed_count(cells: dict[str, dict | None]) -> int:
    """The seeds behind a mode's cells (0 where no table has the mode)."""
    return max((c["seeds"] for c in cells.values() if c), default=0)


def rows(suite: dict, labels: list[str], split: str, root: Path) -> list[list[str]]:
    out = []
    for entry in suite["sets"]:
        tables = set_tables(root / entry["results"], split, entry.get("tables", []))
        for label in labels:
            name = f"{entry['name']} ({entry['small']})"
            same = entry.get("trains_as", {}).get(label)
            if same == STOCK:
                out.append([name, label, "", *["0"] * len(SHOWN), "all: trains the stock loss here"])
                continue
            # the mode's own run where there is one, else the run of the loss it trains here
            measured = label if any(label in results["differences"] for results in tables) else same or label
            cells = mode_cells(tables, measured)
            if same:
                label = f"{label} (trains as {same} here)"
            seeds = seed_count(cells)
            if not seeds:
                out.append([name, label, "0", *["not run"] * len(SHOWN), ""])
                continue
            failed = failed_lines(entry["kind"], cells)
            out.append([name, label, str(seeds), *(cell_text(cells[c]) for c in SHOWN),
                        "all" if not failed else "misses: " + "; ".join(failed)])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", required=True, help="modes as compare.py's --losses names them")
    p.add_argument("--split", default="test", help="the split the tables are of (val: results-val.json)")
    p.add_argument("--suite", default=str(SUITE), help="the suite's data sets (default: bench/suite.yaml)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    try:
        labels = [loss_mode(spec, None)[0] for spec in args.modes]
    except (LossConfigError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if STOCK in labels:
        p.error(f"--modes {STOCK}: the stock loss is the reference every mode is measured against")
    try:
        suite = yaml.safe_load(Path(args.suite).read_text())
    except (OSError, yaml.YAMLError) as e:
        p.error(f"--suite {args.suite}: {one_line(e)}")
    # the split's tables must exist somewhere, or every cell would read "not run" for a typo
    if not any(table_files(ROOT / entry["results"], args.split)[0].is_file() for entry in suite["sets"]):
        p.error(f"--split {args.split}: no set of {args.suite} has tables of that split "
                f"({table_files(Path(), args.split)[0]})")
    if args.out and (problem := output_file_problem(args.out)):
        p.error(f"--out {args.out}: {problem}")
    header = ["data set", "mode", "seeds", *(f"{c} - stock" for c in SHOWN), "goal lines met"]
    table = markdown_table(header, rows(suite, labels, args.split, ROOT))
    notes = "\n".join(f"- {s['name']}: {s['schedule']}; `{s['command']}`" for s in suite["sets"])
    report = (f"{table}\n\nPercentage points on the {args.split} split, the mode minus the stock loss; "
              f"[95% interval]: over seeds (t) where seeds > 1, else the paired bootstrap over images.\n\n{notes}\n")
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
