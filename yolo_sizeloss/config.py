"""Settings as data: loss defaults in ``cfg/losses/<method>.yaml``, run defaults in ``cfg/defaults.yaml``.

A loss specification names methods joined by ``+`` (``plb+scb``) or ``baseline``. The resolved
settings are a plain dict ``{method: {key: value}}`` (empty for baseline), saved with every run, and
serve both detector families: ``terms`` says which YOLO loss terms a weight multiplies,
``rcnn_terms`` which Faster R-CNN terms. Each method's schema is its module's (``yolo_sizeloss.methods``).
Every error names the file, the line and the allowed range, and is raised before training starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from ultralytics.utils import LOGGER

from yolo_sizeloss.methods import REGISTRY
from yolo_sizeloss.paths import CFG_DIR, RUN_DEFAULTS_FILE, VARIANTS_DIR, resolve_loss_cfg, shipped_variants

LOSS_CFG_DIR = CFG_DIR / "losses"
LOSS_FILE = "loss.yaml"  # the resolved loss settings, saved in every run folder of either family
METHODS = tuple(REGISTRY)  # the methods, each with its schema: yolo_sizeloss.methods
ARCHS = ("yolo", "faster_rcnn")


class LossConfigError(ValueError):
    """A loss setting is unknown or out of range; the message says where and what is allowed."""


def _key_lines(text: str, file: Path) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML mapping to its 1-based line, for error messages. A key given twice
    in one mapping is an error: YAML would silently keep the last value."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = (*prefix, str(key.value))
                if path in lines:
                    raise LossConfigError(f"{file}:{key.start_mark.line + 1}: '{'.'.join(path)}' is given twice "
                                          f"(first on line {lines[path]})")
                lines[path] = key.start_mark.line + 1
                walk(value, path)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _read_yaml(path: Path) -> tuple[dict, dict[tuple[str, ...], int]]:
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
        lines = _key_lines(text, path)
    except OSError as e:
        raise LossConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise LossConfigError(f"{path}: not a text file (byte {e.start + 1} is not UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise LossConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}, lines
    if not isinstance(data, dict):
        raise LossConfigError(f"{path}:1: expected a mapping of method sections, got {type(data).__name__}")
    return data, lines


# 1e3 and 2E-4: numbers to Python and YAML 1.2, text to PyYAML (YAML 1.1 wants 1.0e+3)
YAML_TEXT_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _merge_section(
    target: dict, method: str, section: Any, path: Path | str, lines: dict[tuple[str, ...], int]
) -> None:
    """Check ``section``'s settings and set them in ``target``. Errors name ``path`` and, where ``lines``
    knows it (a file's key lines; empty for settings given in Python), the line."""

    def where(*key: str) -> str:
        return f"{path}:{lines.get((method, *key), lines.get((method,), 1))}" if lines else str(path)

    if section is None:
        return
    if not isinstance(section, dict):
        raise LossConfigError(f"{where()}: section '{method}' must be a mapping of settings")
    for key, value in section.items():
        schema = REGISTRY[method].schema
        if key not in schema:
            raise LossConfigError(f"{where(str(key))}: unknown key '{method}.{key}' (known: {', '.join(schema)})")
        ok, allowed = schema[key](value)
        if not ok and isinstance(value, str) and YAML_TEXT_EXPONENT.fullmatch(value):
            raise LossConfigError(f"{where(str(key))}: {method}.{key} = {value!r} is text to YAML, which reads an "
                                  f"exponent as a number only with a dot and a sign: write {float(value)!r}")
        if not ok:
            raise LossConfigError(f"{where(str(key))}: {method}.{key} = {value!r} is out of range: must be {allowed}")
        target[key] = value
    check = REGISTRY[method].check
    problem = check(target) if check is not None and set(REGISTRY[method].schema) <= set(target) else None
    if problem is not None:  # the line of a setting this section gives that takes part, else the section's
        keys, sentence = problem
        raise LossConfigError(f"{where(*[k for k in keys if k in section][:1])}: {sentence}")


def _loss_parts(spec: str) -> list[str]:
    """The '+'-joined parts of a loss specification, each a method, ``baseline`` or a shipped mode
    (a variant of ``cfg/variants`` named alone: its sections are its methods, its settings theirs)."""
    valid = ("baseline", *METHODS)
    if not spec.strip():
        raise LossConfigError(f"--loss {spec!r}: empty; give baseline or methods joined by '+' ({', '.join(METHODS)})")
    parts = [n.strip() for n in spec.split("+")]
    modes = shipped_variants()
    for name in parts:
        if name not in valid and name not in modes:
            raise LossConfigError(
                f"unknown loss {name!r} in {spec!r}: valid names are {', '.join(valid)}, combined with '+', "
                f"or a shipped mode: {', '.join(modes)}"
            )
    if "baseline" in parts and len(parts) > 1:
        raise LossConfigError(f"loss {spec!r}: 'baseline' is the stock loss and cannot be combined")
    return parts


def _mode_methods(mode: str) -> list[str]:
    """The methods a shipped mode sets (its file's sections)."""
    path = VARIANTS_DIR / f"{mode}.yaml"
    data, lines = _read_yaml(path)
    unknown = [m for m in data if m not in REGISTRY]
    if unknown or not data:
        raise LossConfigError(f"{path}:{lines.get((str(unknown[0]),), 1) if unknown else 1}: a mode's sections "
                              f"must be methods ({', '.join(METHODS)})")
    return list(data)


def loss_flag_help() -> str:
    """``--loss``'s help, one text for both families' parsers."""
    return (f"baseline (default), or methods joined by '+': {', '.join(METHODS)}; or a shipped mode (a variant by "
            f"name): {', '.join(shipped_variants())}")


def parse_loss_names(spec: str) -> list[str]:
    """Split a loss specification (``baseline``, ``plb``, ``plb+scb``, a shipped mode such as ``safit``)
    into method names, validated."""
    return _methods_and_modes(spec)[0]


def _methods_and_modes(spec: str) -> tuple[list[str], list[str]]:
    """The methods ``spec`` selects, and the shipped modes among its parts (whose settings apply)."""
    parts = [part for part in _loss_parts(spec) if part != "baseline"]
    modes = [part for part in parts if part not in METHODS]
    setters = [(part, m) for part in parts for m in (_mode_methods(part) if part in modes else [part])]
    names = [m for _, m in setters]
    if twice := next((m for m in names if names.count(m) > 1), None):
        # two modes that set one method (assigner_auto+safit both set nwd) name it only through their files
        given = [part for part, m in setters if m == twice]
        by = "" if given == [twice] * len(given) else f" ({' and '.join(given)} each set {twice})"
        raise LossConfigError(f"loss {spec!r} names a method twice{by}")
    return names, modes


def load_loss_config(spec: str, override: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Resolve ``spec`` into ``{method: settings}``: defaults from ``cfg/losses``, then each shipped mode's
    settings, read from ``cfg/variants`` whatever the working directory holds (``--loss safit`` is
    ``--loss nwd --loss-cfg`` the shipped ``safit``), then ``override``.

    ``override`` is a YAML file, or the name of one shipped in ``cfg/variants``, with sections for
    (some of) the selected methods; a section for a method that ``spec`` does not select, an unknown
    key or an out-of-range value is an error.
    """
    config: dict[str, dict[str, Any]] = {}
    methods, modes = _methods_and_modes(spec)
    for method in methods:
        path = LOSS_CFG_DIR / f"{method}.yaml"
        data, lines = _read_yaml(path)
        if set(data) != {method}:
            raise LossConfigError(f"{path}:1: must hold exactly one section, '{method}'")
        config[method] = {}
        _merge_section(config[method], method, data[method], path, lines)
        missing = set(REGISTRY[method].schema) - set(config[method])
        if missing:
            raise LossConfigError(f"{path}: defaults missing for {', '.join(sorted(missing))}")
    for mode in modes:
        _apply_settings_file(config, VARIANTS_DIR / f"{mode}.yaml", spec)
    if override is not None:
        try:
            path = resolve_loss_cfg(override)
        except FileNotFoundError as e:
            raise LossConfigError(str(e)) from None
        _apply_settings_file(config, path, spec, warn_empty=True)
    return config


def load_loss_mode(mode: str) -> dict[str, dict[str, Any]]:
    """The loss settings of a benchmark mode, ``LOSS`` or ``LOSS:SETTINGS`` (a settings file or a shipped
    variant, as ``--loss-cfg`` takes), as ``bench/compare.py --losses`` names them; empty for baseline."""
    loss, _, settings = mode.partition(":")
    return load_loss_config(loss, settings or None)


def check_loss_config(config: Any, where: str = "loss configuration") -> dict[str, dict[str, Any]]:
    """A loss configuration given in Python (or read from ``where``), ``{method: {setting: value}}``:
    each method known, each setting checked as a settings file's are, the settings not given at their
    defaults. A loss name (``"plb+scb"``) is ``load_loss_config``'s."""
    if isinstance(config, str):
        return load_loss_config(config)
    if not isinstance(config, Mapping):
        raise LossConfigError(f"{where}: a loss configuration is a loss name or a mapping {{method: settings}}, "
                              f"not {type(config).__name__}")
    resolved = {}
    for method, section in config.items():
        if method not in REGISTRY:
            raise LossConfigError(f"{where}: unknown method {method!r} (valid: {', '.join(METHODS)})")
        resolved[method] = dict(load_loss_config(method)[method])
        _merge_section(resolved[method], method, section, where, {})
    return resolved


def _apply_settings_file(config: dict[str, dict[str, Any]], path: Path, spec: str, warn_empty: bool = False) -> None:
    """Overlay a settings file's sections on the selected methods' settings, each key checked."""
    data, lines = _read_yaml(path)
    if not data and warn_empty:
        LOGGER.warning(f"--loss-cfg {path} is empty: the defaults of --loss {spec} apply")
    for method, section in data.items():
        if method not in REGISTRY:
            raise LossConfigError(f"{path}:{lines.get((str(method),), 1)}: unknown method '{method}' "
                                  f"(valid: {', '.join(METHODS)})")
        if method not in config:
            raise LossConfigError(
                f"{path}:{lines.get((str(method),), 1)}: section '{method}' is not selected by --loss {spec} "
                f"(selected: {', '.join(config) or 'baseline'}; select it with "
                f"--loss {method if spec == 'baseline' else f'{spec}+{method}'})"
            )
        _merge_section(config[method], method, section, path, lines)


def loss_name(config: dict[str, dict[str, Any]] | None) -> str:
    """The ``--loss`` specification a resolved config came from (``baseline`` when empty, or None: a run
    with no loss record)."""
    return "+".join(config or {}) or "baseline"


def loss_differences(saved: dict[str, dict[str, Any]], requested: dict[str, dict[str, Any]]) -> list[str]:
    """The settings in which two resolved configs differ, as ``method.key (a -> b)`` (methods as ``method``)."""
    differ = [f"{m} ({'only requested' if m in requested else 'only in the run'})"
              for m in sorted(set(saved) ^ set(requested))]
    for method in (m for m in saved if m in requested):
        for key in sorted(set(saved[method]) | set(requested[method])):
            a, b = saved[method].get(key), requested[method].get(key)
            if a != b:
                differ.append(f"{method}.{key} ({a} -> {b})")
    return differ


def write_loss_record(run_dir: Path, config: dict[str, dict[str, Any]]) -> Path:
    """Save the resolved settings as ``loss.yaml`` in a run folder (either family); a resume reads them back."""
    path = Path(run_dir) / LOSS_FILE
    path.write_text(yaml.safe_dump({"loss": loss_name(config), "settings": config}, sort_keys=False))
    return path


def read_loss_record(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    """The settings ``write_loss_record`` saved in ``run_dir``, checked, each setting added since at its
    default (as ``with_new_settings``); None when the run has none. A damaged record is a LossConfigError
    naming the file."""
    path = Path(run_dir) / LOSS_FILE
    if not path.is_file():
        return None
    data, _ = _read_yaml(path)
    if "settings" not in data:
        raise LossConfigError(f"{path}: not a loss record (no 'settings': damaged?)")
    return check_loss_config(data["settings"] or {}, str(path))


def with_new_settings(saved: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A run's saved settings, with each setting added since it was saved at its default: a new setting's
    default is the behaviour from before it existed (``nwd.box_measure: nwd``), so the run resumes as it
    was trained and compares equal to a request for its loss. For both families' resume."""
    return {method: {**load_loss_config(method)[method], **settings} for method, settings in saved.items()}


def check_resumed_loss(saved: dict | None, requested: dict, where: str) -> str | None:
    """A resumed run keeps its loss: LossConfigError naming the settings in which ``requested`` differs
    from the run's ``saved`` ones (None: a run that saved none, nothing to compare). Returns a line for
    the log when the same methods were asked for in another order."""
    if saved is None:
        return None
    differ = loss_differences(saved, requested)
    if differ:
        # the record names methods, not the mode that set them (safit_sharp_auto_norm is recorded as nwd), so
        # the way to the run's own loss is to give none
        raise LossConfigError(f"{where}: a resumed run keeps its loss ({loss_name(saved)}); "
                              f"the request differs in {', '.join(differ)}; leave --loss and --loss-cfg out to "
                              "resume with the run's own")
    if list(saved) != list(requested):
        return (f"--loss {loss_name(requested)} names the run's methods ({loss_name(saved)}) in another order: "
                "the order of methods does not matter")
    return None


def describe_loss(config: dict[str, dict[str, Any]], arch: str = "yolo") -> str:
    """One line naming the loss and the settings that act in ``arch`` (the other family's terms left out)."""
    if not config:
        return "baseline (the stock loss)"
    hidden = "rcnn_terms" if arch == "yolo" else "terms"
    parts = []
    for method, settings in config.items():
        shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != hidden)
        parts.append(f"{method} ({shown})")
    return " + ".join(parts)


def run_defaults(arch: str) -> dict[str, Any]:
    """The run defaults of ``arch`` from ``cfg/defaults.yaml`` (a flag given on the command line wins)."""
    data, _ = _read_yaml(RUN_DEFAULTS_FILE)
    if arch not in data:
        raise LossConfigError(f"{RUN_DEFAULTS_FILE}: no section '{arch}'")
    return dict(data[arch])
