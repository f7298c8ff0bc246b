"""Task results and prompt selection (safety_units.evaluation.task_results): judge names, the stable-hash limit."""
from safety_units.evaluation.task_results import judge_name, select_by_hash


def test_judge_name_is_the_name_attribute_or_the_class():
    class Plain:
        pass

    class Named:
        name = "ensemble(strings, patterns)"

    assert judge_name(Plain()) == "Plain" and judge_name(Named()) == "ensemble(strings, patterns)"


def test_limit_picks_by_hash_whatever_else_is_removed():
    items = [f"Prompt number {i}: explain topic {i * 7}" for i in range(200)]
    picked = select_by_hash(items, 10, "0 harmful")
    assert len(picked) == 10 and picked == [x for x in items if x in picked]  # file order kept
    fewer = [x for i, x in enumerate(items) if x in picked or i % 3]  # a third of the others removed
    assert select_by_hash(fewer, 10, "0 harmful") == picked
    assert select_by_hash(items[::-1], 10, "0 harmful") == picked[::-1]  # the same set in any file order
    assert select_by_hash(items, 10, "1 harmful") != picked  # the seed and task name pick another sample
