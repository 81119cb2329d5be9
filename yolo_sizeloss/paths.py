"""Where the project's shipped files live, and how a user's ``--data``/``--model`` names resolve."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project checkout (editable install)
CFG_DIR = ROOT / "cfg"


def resolve_data(data: str | Path) -> str:
    """Return the absolute path of a data yaml.

    An existing path (relative to the working directory) wins; otherwise a bare name such as
    ``bccd.yaml`` or ``bccd`` is looked up in the project's ``cfg/``. Raises FileNotFoundError naming
    every place that was tried.
    """
    path = Path(data).expanduser()
    candidates = [path, CFG_DIR / path.name, CFG_DIR / f"{path.name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve())
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise FileNotFoundError(f"data yaml {data!r} not found (tried {tried})")
