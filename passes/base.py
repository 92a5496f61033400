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
no state between calls.
"""

from __future__ import annotations

import abc
import logging
import time
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
