"""The per-epoch weighting plot of a run, from a results.csv with Ultralytics' padded column names."""

import math

from PIL import Image

from yolo_sizeloss.results_csv import read_columns
from yolo_sizeloss.weighting_plot import plot_weighting

HEADER = ("                  epoch,                   time,         train/box_loss,             feedback/r,"
          "             feedback/q,          feedback/gain,   sizeloss/box_w_small,   sizeloss/box_w_other")


def test_weighting_columns_are_read_with_stripped_names_and_plotted(tmp_path):
    (tmp_path / "results.csv").write_text(
        HEADER + "\n"
        "1,50.1,4.2,0.006,0.12,4,1.9,1.0\n"
        "2,101.3,3.9,0.03,0.11,3.67,1.7,1.05\n"
        "3,150.0,3.5,,0.10,2.5,1.6,1.1\n"
    )
    columns = read_columns(tmp_path / "results.csv")
    assert columns["feedback/gain"] == [4.0, 3.67, 2.5] and columns["epoch"] == [1.0, 2.0, 3.0]
    assert math.isnan(columns["feedback/r"][2])  # an empty cell
    path = plot_weighting(tmp_path)
    assert path == tmp_path / "weighting.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1650, 418)  # three panels of 5 x 3.8 inches at 110 dpi


def test_a_run_without_weighting_columns_gets_a_plot_that_says_so(tmp_path):
    (tmp_path / "results.csv").write_text("epoch,time,train/box_loss\n1,50.1,4.2\n")
    path = plot_weighting(tmp_path)
    with Image.open(path) as image:
        assert path == tmp_path / "weighting.png" and image.size == (550, 176)  # the 5 x 1.6 inch note
    assert plot_weighting(tmp_path / "missing") is None


def test_faster_rcnn_stage_columns_join_the_feedback_panels(tmp_path):
    (tmp_path / "results.csv").write_text(
        "epoch,time,feedback/rpn/r,feedback/rpn/q,feedback/rpn/gain,feedback/roi/r,feedback/roi/q,feedback/roi/gain\n"
        "1,10,0.02,0.1,4,0.05,0.1,2\n2,20,0.04,0.1,2.5,0.06,0.1,1.7\n")
    path = plot_weighting(tmp_path)
    with Image.open(path) as image:
        assert image.size == (1100, 418)  # two panels: shares and gain (no per-anchor weight columns)


def test_plotting_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """A notebook user's interactive backend must survive a plot drawn during training."""
    import matplotlib

    (tmp_path / "results.csv").write_text("epoch,time,feedback/gain\n1,50.1,4\n")
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any backend but the Agg the plots draw with
    try:
        assert plot_weighting(tmp_path) == tmp_path / "weighting.png"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
