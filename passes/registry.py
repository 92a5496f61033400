"""Every pass by name, for the CLI (``passes``, ``apply``) and pipeline files."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import tomllib
from pathlib import Path
from typing import Any

from neodragon_npu.passes.base import Pass

IR_FOLDERS = ("fx", "onnx")
ENTRY_KEYS = {"name", "options"}  # the keys of one [[passes]] entry  # passes/<ir>/<name>.py holds the pass registered as <name>


def _discover() -> dict[str, type[Pass]]:
    """Every pass module under passes/fx and passes/onnx, by file name: each holds one Pass
    subclass whose NAME is that file name (a misnamed pass fails here, at import)."""
    found: dict[str, type[Pass]] = {}
    root = Path(__file__).parent
    for ir_name in IR_FOLDERS:
        for info in sorted(pkgutil.iter_modules([str(root / ir_name)]), key=lambda i: i.name):
            module = importlib.import_module(f"{__package__}.{ir_name}.{info.name}")
            classes = [c for c in vars(module).values()
                       if isinstance(c, type) and issubclass(c, Pass) and c.__module__ == module.__name__]
            if len(classes) != 1:
                raise ImportError(f"passes/{ir_name}/{info.name}.py defines {len(classes)} passes; one per file")
            cls = classes[0]
            if cls.NAME != info.name or cls.IR != ir_name:
                raise ImportError(f"passes/{ir_name}/{info.name}.py: {cls.__name__} has NAME {cls.NAME!r} and IR "
                                  f"{cls.IR!r}; the file's name and folder are {info.name!r} and {ir_name!r}")
            declared = set(cls.OPTIONS) | set(cls.ENGINE_OPTIONS)
            if declared != set(pass_options(cls)):
                raise ImportError(f"passes/{ir_name}/{info.name}.py: OPTIONS and ENGINE_OPTIONS declare "
                                  f"{sorted(declared)}; its keyword options are {sorted(pass_options(cls))}")
            found[cls.NAME] = cls
    return found


def pass_options(cls: type[Pass]) -> dict[str, Any]:
    """Keyword options of a pass and their defaults (``inspect.Parameter.empty`` if required)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


PASSES: dict[str, type[Pass]] = _discover()


def create_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    """The pass ``name`` with ``options`` checked against its declared types and ranges."""
    if name not in PASSES:
        raise ValueError(f"unknown pass {name!r}; run `neodragon-npu passes` to list them")
    cls = PASSES[name]
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"pass {name}: options must be a table of name = value, not {options!r}")
    options = dict(options or {})
    cls.check_options(options)
    required = {n for n, d in pass_options(cls).items() if d is inspect.Parameter.empty} - set(options)
    engine = sorted(required & set(cls.ENGINE_OPTIONS))
    if engine:
        raise ValueError(f"pass {name} needs {', '.join(engine)}, which only a build provides (neodragon-npu build)")
    if required:
        raise ValueError(f"pass {name}: missing required options {', '.join(sorted(required))}")
    return cls(**options)


def load_pipeline_file(path: str | Path) -> list[Pass]:
    """A pipeline file is TOML (``[[passes]] name = ..., options = {...}``) or the same as JSON."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such pipeline file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot parse pipeline file ({exc})") from None
    entries = data.get("passes") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list 'passes' of {{name, options}} entries")
    extra = sorted(set(data) - {"passes"})
    if extra:
        raise ValueError(f"{path}: unknown top-level key {extra[0]!r} (a pipeline file holds only 'passes')")
    passes = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{path}: passes[{i}] has no 'name'")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            raise ValueError(f"{path}: passes[{i}] ({entry['name']}) has unknown key {unknown[0]!r}; "
                             f"an entry holds {' and '.join(sorted(ENTRY_KEYS))}")
        try:
            passes.append(create_pass(entry["name"], entry.get("options")))
        except ValueError as exc:
            raise ValueError(f"{path}: passes[{i}]: {exc}") from None
    return passes
