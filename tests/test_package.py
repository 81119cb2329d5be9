"""The package as a user installs it: a built wheel, outside the checkout, trains and validates from another folder."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


def run(cmd, cwd, env) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_wheel_installs_anywhere_and_trains_on_the_shipped_bccd(tmp_path):
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "0"}
    source = tmp_path / "source"  # setuptools builds in the source tree: a copy keeps the checkout clean
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "yolo_sizeloss", source / "yolo_sizeloss",
                    ignore=shutil.ignore_patterns("__pycache__", "*.cache", "data.yaml"))
    # --no-build-isolation: the build uses the setuptools at hand, nothing is downloaded
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)], cwd=tmp_path, env=env)
    wheel = next((tmp_path / "dist").glob("yolo_sizeloss-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("yolo_sizeloss/cfg/bccd.yaml", "yolo_sizeloss/cfg/defaults.yaml", "yolo_sizeloss/cfg/losses/feedback.yaml",
                 "yolo_sizeloss/cfg/variants/box_only.yaml", "yolo_sizeloss/datasets/bccd/LICENSE"):
        assert data in names, data
    assert sum(n.startswith("yolo_sizeloss/datasets/bccd/images/") for n in names) == 205 + 87 + 72

    site, work = tmp_path / "site", tmp_path / "elsewhere"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], cwd=tmp_path, env=env)
    work.mkdir()
    env["PYTHONPATH"] = str(site)  # ahead of the editable checkout: the installed copy is the one imported
    where = run([sys.executable, "-c", "import yolo_sizeloss; print(yolo_sizeloss.__file__)"], cwd=work, env=env)
    assert where.stdout.strip().startswith(str(site))
    command = [str(site / "bin" / "yolo-sizeloss")]
    run([*command, "train", "--data", "bccd.yaml", "--loss", "feedback", "--epochs", "1", "--fraction", "0.1",
         "--imgsz", "160", "--batch", "8", "--workers", "0", "--device", "cpu"], cwd=work, env=env)
    run_dir = work / "runs" / "train" / "feedback"
    assert (run_dir / "weights" / "best.pt").is_file() and (run_dir / "loss.yaml").is_file()
    assert (run_dir / "results.png").is_file() and (run_dir / "weighting.png").is_file()
    run([*command, "val", "--model", str(run_dir / "weights" / "best.pt"), "--data", "bccd.yaml", "--split", "test",
         "--device", "cpu", "--bootstrap", "0"], cwd=work, env=env)
    metrics = json.loads((work / "runs" / "val" / "exp" / "metrics.json").read_text())
    assert metrics["meta"]["imgsz"] == 160 and metrics["meta"]["images"] == 72


def package_imports() -> dict[str, set[str]]:
    """For each module of the package, the package modules it imports anywhere in its body (function-local
    imports too: an import cycle hidden inside a function is still a cycle)."""
    import ast

    package = ROOT / "yolo_sizeloss"
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("yolo_sizeloss"):
                # "from yolo_sizeloss import convert" imports the module convert
                imported |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                             for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("yolo_sizeloss")}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the import graph as a list of modules, or None."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = package_imports()
    assert graph["yolo_sizeloss.cli"] >= {"yolo_sizeloss.checks", "yolo_sizeloss.rcnn.cli"}  # the reader sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # and the checker finds one where there is one
    assert find_cycle({**graph, "yolo_sizeloss.checks": graph["yolo_sizeloss.checks"] | {"yolo_sizeloss.cli"}})
