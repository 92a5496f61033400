"""The pass contract (after onnx_ir.passes) shared by FX and ONNX passes.

A pass is called on a model and returns ``PassResult(model, modified)``. The base class runs
``requires`` (precondition) on the input, then ``call``, then ``ensures`` (postcondition) on
the *result*, and checks that an in-place pass really returned the object it was given.
``modified`` must be computed honestly: a pass that found nothing to do returns False and
leaves the model untouched, so running any pass twice reports no change the second time.

Models are ``torch.fx.GraphModule`` for FX passes and ``onnx_ir.Model`` for ONNX passes
(``IR = "fx"`` or ``"onnx"``). Options are keyword-only constructor arguments; passes keep
no state between calls.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
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


class Pass(abc.ABC):
    """One graph transformation. Subclasses set ``IR`` and implement :meth:`call`."""

    IR: ClassVar[str] = ""  # "fx" or "onnx"
    IN_PLACE: ClassVar[bool] = True
    NAME: ClassVar[str] = ""  # registry name when snake_case of the class name reads badly

    @classmethod
    def pass_name(cls) -> str:
        """Registry name: ``NAME``, or the class name without "Pass" in snake_case."""
        if cls.NAME:
            return cls.NAME
        name = cls.__name__.removesuffix("Pass")
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")

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
        result = self.call(model)
        if not isinstance(result, PassResult):
            raise PassError(f"{self.pass_name()} returned {type(result).__name__}, not PassResult")
        if self.IN_PLACE and result.model is not model:
            raise PassError(f"{self.pass_name()} is declared in-place but returned a new model")
        self.ensures(result.model)
        return result

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class Sequential(Pass):
    """Run passes in order; modified if any of them modified the model."""

    IN_PLACE = False

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


class PassManager(Pass):
    """Run passes in order, up to ``steps`` times until nothing changes.

    ``check`` (e.g. graph verification) runs after every pass when given;
    ``dump_dir`` receives a readable dump of the model after every pass, named
    ``NN_<pass>.txt``, made by ``dump`` (a function model -> text).
    """

    IN_PLACE = False

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
                record = PassRecord(p.pass_name(), result.modified, time.perf_counter() - start)
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
        return PassManagerResult(model, any_modified, records)


@dataclass
class PassManagerResult(PassResult):
    records: list[PassRecord]
