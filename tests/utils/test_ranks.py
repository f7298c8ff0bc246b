"""One voice per job (safety_units.utils.ranks): RankedLogger and rank_zero_print speak on rank zero only, the rank
comes from Lightning once it has set one and from the launcher's environment before that."""
import logging

import pytest
from lightning_utilities.core.rank_zero import rank_zero_only

from safety_units.utils.ranks import RANK_VARIABLES, RankedLogger, current_rank, rank_zero_print

NAME = "safety_units.tests.ranks"


@pytest.fixture
def rank(monkeypatch):
    """Set this process' rank as Lightning would (`rank_zero_only.rank`); restored after the test."""
    return lambda r: monkeypatch.setattr(rank_zero_only, "rank", r, raising=False)


def test_the_rank_is_lightnings_then_the_launchers_then_zero(rank, monkeypatch):
    for var in RANK_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    rank(None)
    assert current_rank() == 0  # a single process: rank zero
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert current_rank() == 3  # torchrun / trainer=ddp before Lightning has set a rank
    monkeypatch.setenv("RANK", "5")
    assert current_rank() == 5  # RANK first, as Lightning reads them
    rank(2)
    assert current_rank() == 2  # Lightning's rank wins once set (ddp_spawn workers)


def test_rank_zero_logs_and_names_the_caller(rank, caplog):
    rank(0)
    caplog.set_level(logging.INFO, logger=NAME)
    RankedLogger(NAME).info("hello %s", "there")
    RankedLogger(NAME, rank_zero_only=False).info("every rank")
    assert [r.getMessage() for r in caplog.records] == ["hello there", "every rank"]  # no prefix on rank zero
    assert {r.funcName for r in caplog.records} == {"test_rank_zero_logs_and_names_the_caller"}


def test_other_ranks_are_silent_unless_asked_and_then_prefixed(rank, caplog):
    rank(1)
    caplog.set_level(logging.INFO, logger=NAME)
    RankedLogger(NAME).warning("rank zero only")
    RankedLogger(NAME, rank_zero_only=False).warning("shard %d", 7)
    assert [r.getMessage() for r in caplog.records] == ["[rank 1] shard 7"]
    caplog.clear()
    caplog.set_level(logging.WARNING, logger=NAME)
    RankedLogger(NAME, rank_zero_only=False).info("below the level")
    assert not caplog.records


@pytest.mark.parametrize("r,printed", [(0, "a table\n"), (1, "")])
def test_rank_zero_print_prints_on_rank_zero_only(rank, capsys, r, printed):
    rank(r)
    rank_zero_print("a", "table")
    assert capsys.readouterr().out == printed
