import pytest

from neodragon_npu.passes.base import Pass, PassError, PassManager, PassResult, PostconditionError, PreconditionError, Sequential


class Box:
    def __init__(self, n):
        self.n = n


class Decrement(Pass):
    """Decrement a counter down to zero."""

    IR = "test"
    NAME = "decrement"

    def call(self, model):
        if model.n == 0:
            return PassResult(model, False)
        model.n -= 1
        return PassResult(model, True)


class Replace(Pass):
    IR = "test"
    NAME = "replace"

    def call(self, model):
        return PassResult(Box(model.n), False)


class Guarded(Pass):
    IR = "test"
    NAME = "guarded"

    def requires(self, model):
        if model.n < 0:
            raise PreconditionError("negative")

    def call(self, model):
        model.n = -5
        return PassResult(model, True)

    def ensures(self, model):
        if model.n < 0:
            raise PostconditionError("went negative")


def test_names_and_summaries_come_from_the_class():
    assert Decrement.pass_name() == "decrement"
    assert Decrement.summary() == "Decrement a counter down to zero."


def test_in_place_passes_must_return_their_input():
    with pytest.raises(PassError, match="declared in-place"):
        Replace()(Box(1))


def test_pre_and_postconditions_run_around_the_pass():
    with pytest.raises(PreconditionError):
        Guarded()(Box(-1))
    with pytest.raises(PostconditionError):
        Guarded()(Box(1))


def test_sequential_reports_any_modification():
    result = Sequential([Decrement(), Decrement()])(Box(1))
    assert result.modified and result.model.n == 0
    assert not Sequential([Decrement()])(Box(0)).modified


def test_pass_manager_iterates_to_a_fixpoint_and_records(tmp_path):
    manager = PassManager([Decrement()], steps=10, dump_dir=tmp_path, dump=lambda m: f"n={m.n}")
    result = manager(Box(3))
    assert result.model.n == 0 and result.modified
    assert [r.modified for r in result.records] == [True, True, True, False]
    assert (tmp_path / "04_decrement.txt").read_text() == "n=0"


def test_pass_manager_check_names_the_pass():
    def check(model):
        if model.n == 1:
            raise ValueError("one is not allowed")

    with pytest.raises(PostconditionError, match="after pass decrement: one is not allowed"):
        PassManager([Decrement()], steps=5, check=check)(Box(3))
