"""The pass contract (after onnx_ir.passes) shared by FX and ONNX passes.

A pass is called on a model and returns ``PassResult(model, modified)``. The base class runs
``requires`` (precondition) on the input, then ``call``, then ``ensures`` (postcondition) on
the *result*, and checks that an in-place pass really returned the object it was given.
``modified`` must be computed honestly: a pass that found nothing to do returns False and
leaves the model untouched, so running any pass twice reports no change the second time.

A pass that leaves a site alone says why (onnxscript's check-with-a-reason habit):
``self.leave(site, reason)`` inside ``call`` records it; the reasons come back as
``PassResult.notes``, are logged at debug level, and ``apply --explain`` prints them. A pass
that found no candidate at all gets one note saying what it looked for (``LOOKS_FOR``).

Models are ``torch.fx.GraphModule`` for FX passes and ``onnx_ir.Model`` for ONNX passes
(``IR = "fx"`` or ``"onnx"``). Options are keyword-only constructor arguments; passes keep
no state between calls. The options a pipeline file may set are declared in ``OPTIONS``
with their type, range and meaning (``passes --options`` shows them; ``create_pass`` checks
them before any pass runs); the others (``ENGINE_OPTIONS``: calibration data in memory,
callbacks) only the build engine sets.
"""

from __future__ import annotations

import abc
import logging
import time
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

logger = logging.getLogger("neodragon_npu.passes")


class PassError(RuntimeError):
    """A pass failed or broke its contract."""


class PreconditionError(PassError):
    """The model does not satisfy what a pass requires."""


class PostconditionError(PassError):
    """A pass produced a model that breaks what it ensures."""


class OptionError(ValueError):
    """A pass option of the wrong type or outside its range."""


# Option kinds and the Python values (as TOML or JSON give them) each accepts.
_KINDS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "path": lambda v: isinstance(v, (str, Path)) and str(v) != "",
}


@dataclass(frozen=True)
class Option:
    """One option a pipeline file may set. ``kind`` is int, float, bool, str or path, or a
    list of one of them ("int list"); ``length`` fixes a list's length; ``min``/``max``
    bound a number (or every number of a list); ``choices`` lists the allowed values;
    ``none_ok``: null (JSON) means "not set"."""

    kind: str
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple = ()
    length: int | None = None
    none_ok: bool = False
    exists: bool = False  # a path that must name an existing file (an input)

    def __post_init__(self) -> None:
        if self.kind.removesuffix(" list") not in _KINDS:
            raise ValueError(f"unknown option kind {self.kind!r}")

    def describe(self) -> str:
        """The type and range, e.g. ``int >= 1`` or ``str, one of min_max, percentile``."""
        out = self.kind if self.length is None else f"{self.kind} of {self.length}"
        if self.min is not None and self.max is not None:
            out += f" in [{self.min:g}, {self.max:g}]"
        elif self.min is not None:
            out += f" >= {self.min:g}"
        elif self.max is not None:
            out += f" <= {self.max:g}"
        if self.choices:
            out += ", one of " + ", ".join(str(c) for c in self.choices)
        return out

    def check(self, value: Any) -> str | None:
        """What is wrong with ``value`` (None: nothing)."""
        if value is None:
            return None if self.none_ok else "must be set (null is not allowed)"
        base = self.kind.removesuffix(" list")
        if self.kind.endswith(" list"):
            if not isinstance(value, (list, tuple)):
                return f"must be a list of {base}"
            if self.length is not None and len(value) != self.length:
                return f"must hold {self.length} values, not {len(value)}"
            items = list(value)
        else:
            items = [value]
        for item in items:
            if not _KINDS[base](item):
                return f"must be {'a list of ' + base if self.kind.endswith(' list') else base}, not {item!r}"
            if self.choices and item not in self.choices:
                return f"must be one of {', '.join(str(c) for c in self.choices)}"
            if self.min is not None and item < self.min:
                return f"must be at least {self.min:g}"
            if self.max is not None and item > self.max:
                return f"must be at most {self.max:g}"
            if self.exists and not Path(item).is_file():
                return "names no existing file"
        return None


@dataclass
class PassResult:
    model: Any
    modified: bool
    notes: list[str] = field(default_factory=list)  # why sites were left alone


class Pass(abc.ABC):
    """One graph transformation. Subclasses set ``IR`` and implement :meth:`call`."""

    IR: ClassVar[str] = ""  # "fx" or "onnx"
    IN_PLACE: ClassVar[bool] = True
    NAME: ClassVar[str] = ""  # registry name: the file's name (a contract test checks it)
    LOOKS_FOR: ClassVar[str] = ""  # what a site looks like, for the note when none is found
    OPTIONS: ClassVar[dict[str, Option]] = {}  # what a pipeline file may set
    ENGINE_OPTIONS: ClassVar[tuple[str, ...]] = ()  # what only the build engine sets

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Refuse, naming the pass and the option, anything a pipeline file may not set, and
        any value of the wrong type or outside its range."""
        name = cls.pass_name()
        for key, value in options.items():
            if key in cls.ENGINE_OPTIONS:
                raise OptionError(f"pass {name}: option {key} is set by the build engine, not a pipeline file")
            if key not in cls.OPTIONS:
                known = ", ".join(sorted(cls.OPTIONS)) or "none"
                raise OptionError(f"pass {name}: unknown option {key!r} (its options: {known})")
            problem = cls.OPTIONS[key].check(value)
            if problem:
                raise OptionError(f"pass {name}: option {key} = {value!r} {problem} ({cls.OPTIONS[key].help})")

    @classmethod
    def pass_name(cls) -> str:
        """Registry name: ``NAME``, which equals the pass's module (file) name."""
        if not cls.NAME:
            raise PassError(f"{cls.__name__} sets no NAME (the name of its file)")
        return cls.NAME

    def leave(self, site: str, reason: str) -> None:
        """Record that ``site`` was left alone and why (see the module docstring)."""
        self._notes.append(f"{site}: {reason}")
        logger.debug("      %s leaves %s alone: %s", self.pass_name(), site, reason)

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def requires(self, model: Any) -> None:
        """Raise PreconditionError when ``model`` cannot be processed."""

    def ensures(self, model: Any) -> None:
        """Raise PostconditionError when the result breaks an invariant of this pass."""

    @abc.abstractmethod
    def call(self, model: Any) -> PassResult: ...

    def __call__(self, model: Any) -> PassResult:
        self.requires(model)
        self._notes: list[str] = []
        try:
            result = self.call(model)
        except Exception as exc:
            exc.add_note(f"(in pass {self.pass_name()})")
            raise
        if not isinstance(result, PassResult):
            raise PassError(f"{self.pass_name()} returned {type(result).__name__}, not PassResult")
        if self.IN_PLACE and result.model is not model:
            raise PassError(f"{self.pass_name()} is declared in-place but returned a new model")
        result.notes = self._notes + result.notes
        if not result.modified and not result.notes:
            result.notes.append(f"nothing to do: no {self.LOOKS_FOR or 'site'} in the graph")
            logger.debug("      %s: %s", self.pass_name(), result.notes[-1])
        del self._notes
        self.ensures(result.model)
        return result

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "_notes"}


class Sequential(Pass):
    """Run passes in order; modified if any of them modified the model."""

    IN_PLACE = False
    NAME = "sequential"

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def call(self, model: Any) -> PassResult:
        modified = False
        for p in self.passes:
            result = p(model)
            model, modified = result.model, modified or result.modified
        return PassResult(model, modified)


@dataclass
class PassRecord:
    """What one pass did in a PassManager run (for reports and progress)."""

    name: str
    modified: bool
    seconds: float
    notes: list[str] = field(default_factory=list)


class PassManager(Pass):
    """Run passes in order, up to ``steps`` times until nothing changes.

    ``check`` (e.g. graph verification) runs after every pass when given;
    ``dump_dir`` receives a readable dump of the model after every pass, named
    ``NN_<pass>.txt``, made by ``dump`` (a function model -> text).
    """

    IN_PLACE = False
    NAME = "pass_manager"

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        steps: int = 1,
        check: Callable[[Any], None] | None = None,
        dump_dir: str | Path | None = None,
        dump: Callable[[Any], str] | None = None,
    ) -> None:
        if steps < 1:
            raise ValueError("PassManager needs steps >= 1")
        if dump_dir is not None and dump is None:
            raise ValueError("PassManager: dump_dir needs a dump function")
        self.passes = list(passes)
        self.steps = steps
        self.check = check
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.dump = dump

    def call(self, model: Any) -> "PassManagerResult":
        records: list[PassRecord] = []
        any_modified = False
        for step in range(self.steps):
            step_modified = False
            for p in self.passes:
                start = time.perf_counter()
                result = p(model)
                model = result.model
                record = PassRecord(p.pass_name(), result.modified, time.perf_counter() - start, result.notes)
                records.append(record)
                logger.info(
                    "      pass %-28s %s in %.2f s",
                    record.name,
                    "modified" if record.modified else "no change",
                    record.seconds,
                )
                if self.check is not None:
                    try:
                        self.check(model)
                    except Exception as exc:
                        raise PostconditionError(
                            f"verification failed after pass {record.name}: {exc}"
                        ) from exc
                if self.dump_dir is not None:
                    self.dump_dir.mkdir(parents=True, exist_ok=True)
                    n = len(records)
                    (self.dump_dir / f"{n:02d}_{record.name}.txt").write_text(self.dump(model))
                step_modified |= result.modified
            any_modified |= step_modified
            if not step_modified:
                break
        return PassManagerResult(model, any_modified, records=records)


@dataclass
class PassManagerResult(PassResult):
    records: list[PassRecord] = field(default_factory=list)


def calibration_feeds(calibration, pass_name: str) -> list[dict]:
    """A pass's ``calibration`` option as feeds: an .npz sample file or a sequence of feeds
    (copied into dicts); none at all is refused, naming the pass."""
    from neodragon_npu.graphs.feeds import load_samples

    feeds = load_samples(calibration) if isinstance(calibration, (str, Path)) else [dict(f) for f in calibration]
    if not feeds:
        raise PreconditionError(f"{pass_name}: no calibration samples")
    return feeds
