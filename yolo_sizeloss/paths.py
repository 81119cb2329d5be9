"""Where the package's shipped files live, and how a user's ``--data`` and ``--loss-cfg`` names resolve.

The loss defaults (``cfg/losses``), their shipped variants (``cfg/variants``), the run defaults
(``cfg/defaults.yaml``), the BCCD data yaml and the BCCD images are package data, found through
``importlib.resources`` so that an installed wheel works from any directory. Ultralytics opens data
yamls and images by path, so the package must be installed unzipped (pip always does).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CFG_DIR = Path(str(files("yolo_sizeloss") / "cfg"))
VARIANTS_DIR = CFG_DIR / "variants"
RUN_DEFAULTS_FILE = CFG_DIR / "defaults.yaml"


def shipped_named(name: str, shipped: dict[str, Path]) -> list[Path]:
    """The ``shipped`` files (by file name) a bare ``name`` names: itself, then ``NAME.yaml``."""
    return [shipped[key] for key in (name, f"{name}.yaml") if key in shipped]


def resolve_shipped(name: str | Path, shipped: dict[str, Path], what: str) -> Path:
    """Return the absolute path of a file a user names.

    A file in the working directory wins (a bare name without a suffix also as ``NAME.yaml``, as the
    shipped ones are looked up); otherwise a bare name such as ``bccd.yaml`` or ``bccd`` is looked up
    among the package's ``shipped`` files (by file name). A name with a folder in it is a path only: a
    missing ``old/bccd.yaml`` must not become the shipped one. Raises FileNotFoundError naming every
    place that was tried.
    """
    path = Path(name).expanduser()
    bare = str(name) == path.name
    candidates = [path]
    if bare:
        if not path.suffix:
            candidates.append(path.with_suffix(".yaml"))
        candidates += shipped_named(path.name, shipped)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    if path.is_dir():
        raise FileNotFoundError(f"{what} {str(name)!r} is a folder; give a YAML file")
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise FileNotFoundError(f"{what} {str(name)!r} not found (tried {tried})")


def resolve_data(data: str | Path) -> str:
    """A data yaml's absolute path: a path, or a name shipped in ``cfg/`` (``bccd.yaml``, ``bccd``); for a bare
    name the FileNotFoundError lists the shipped ones, and says so where it is one of Ultralytics' own data yamls
    (``coco8.yaml``), whose images stock Ultralytics downloads and this package does not."""
    try:
        return str(resolve_shipped(data, shipped_data(), "data yaml"))  # not the run defaults beside them
    except FileNotFoundError as e:
        if str(data) != Path(data).name:  # a path is only that path: no shipped name stands in for it
            raise
        note = f"; shipped: {', '.join(shipped_data())}"
        if ultralytics_data_yaml(str(data)) is not None:
            note += (f"; {data} is one of Ultralytics' data yamls, whose images stock Ultralytics downloads: "
                     "nothing is downloaded here, so download the data set and give its yaml's path")
        raise FileNotFoundError(f"{e}{note}") from None


def ultralytics_data_yaml(name: str) -> Path | None:
    """The data yaml Ultralytics ships under ``name`` (``coco8.yaml`` or ``coco8``), None if it ships none."""
    folder = Path(str(files("ultralytics") / "cfg" / "datasets"))
    for candidate in (folder / name, folder / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def run_data_path(stored: str) -> str:
    """The data yaml a run recorded, for its resume: the path as stored, or, where that file is gone and
    was a data yaml this package ships (``.../yolo_sizeloss/cfg/bccd.yaml`` of a checkout or install since
    moved), the one shipped here: a run trained on the shipped data resumes wherever the package is."""
    path = Path(stored)
    shipped = shipped_data().get(path.name)
    if shipped and not path.is_file() and path.parent.parts[-2:] == CFG_DIR.parts[-2:]:
        return str(shipped.resolve())
    return stored


def resolve_loss_cfg(settings: str | Path) -> Path:
    """A ``--loss-cfg`` file's absolute path: a path, or a variant shipped in ``cfg/variants``
    (``box_only``, ``gt_areas.yaml``); the FileNotFoundError lists the shipped variants."""
    try:
        return resolve_shipped(settings, shipped_variant_files(), "loss settings")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; shipped variants: {', '.join(shipped_variants())}") from None


def shipped_variant_files() -> dict[str, Path]:
    """The loss-settings variants shipped in ``cfg/variants``, by file name."""
    return {p.name: p for p in sorted(VARIANTS_DIR.glob("*.yaml"))}


def shipped_variants() -> list[str]:
    """The names of the loss-settings variants shipped in ``cfg/variants``."""
    return [Path(name).stem for name in shipped_variant_files()]


def shipped_data() -> dict[str, Path]:
    """The data yamls the package ships, by file name (``cfg/*.yaml`` but the run defaults)."""
    return {p.name: p for p in sorted(CFG_DIR.glob("*.yaml")) if p != RUN_DEFAULTS_FILE}


def resolve_shipped_file(name: str) -> Path:
    """The absolute path of a data yaml (``bccd.yaml``) or loss-settings variant the package ships, for
    commands outside this package (stock ``yolo val``) that need a path; a file of that name in the
    working folder does not count."""
    # a bare name only: an absolute or relative path would resolve outside the package (/etc/passwd)
    if Path(name).name == name not in ("", ".", ".."):
        for shipped in (shipped_data(), shipped_variant_files()):
            for found in shipped_named(name, shipped):
                return found.resolve()
    raise FileNotFoundError(f"{name!r} is not shipped (data: {', '.join(shipped_data())}; "
                            f"loss variants: {', '.join(shipped_variants())})")
