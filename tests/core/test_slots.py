"""One unit, one prompt: adding or removing one record (or one user) changes at most one
prompt of any step, in both regimes, for pools of every size, including units added at slot
boundaries (full slots, the first and the last slot)."""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_decoding.generate import DemoGenerator
from dp_decoding.plan import make_plan
from dp_decoding.records import Record, record_unit
from dp_decoding.slots import SlotAssigner
from prompts import generic_task
from tests.fakes import FakeEngine

KEY = b"k" * 32


def rec(text: str, label: str = "A", user: str | None = None) -> Record:
    return Record(text=text, label=label, unit=record_unit(text, label, user))


texts = st.text(alphabet="abcdefghij ", min_size=1, max_size=8)
pools = st.lists(texts, max_size=60, unique=True)


def changed_slots(a: list[list[Record]], b: list[list[Record]]) -> int:
    return sum(1 for x, y in zip(a, b, strict=True) if x != y)


@settings(max_examples=300, deadline=None)
@given(pool=pools, extra=texts, slots=st.integers(1, 12), cap=st.integers(1, 4))
def test_add_one_record_changes_at_most_one_slot(
    pool: list[str], extra: str, slots: int, cap: int
) -> None:
    assigner = SlotAssigner(KEY, slots, cap)
    base = [rec(t) for t in pool if t != extra]
    before = assigner.assign(base)
    after = assigner.assign([*base, rec(extra)])
    assert changed_slots(before, after) <= 1
    assert all(len(s) <= cap for s in after)


@settings(max_examples=200, deadline=None)
@given(pool=pools, slots=st.integers(1, 8), cap=st.integers(1, 3), data=st.data())
def test_remove_one_record_changes_at_most_one_slot(
    pool: list[str], slots: int, cap: int, data: st.DataObject
) -> None:
    if not pool:
        return
    assigner = SlotAssigner(KEY, slots, cap)
    records = [rec(t) for t in pool]
    victim = data.draw(st.sampled_from(records))
    before = assigner.assign(records)
    after = assigner.assign([r for r in records if r != victim])
    assert changed_slots(before, after) <= 1


@settings(max_examples=150, deadline=None)
@given(pool=pools, slots=st.integers(1, 6), cap=st.integers(1, 3))
def test_units_at_slot_boundaries(pool: list[str], slots: int, cap: int) -> None:
    """Add a unit that lands in a full slot, in slot 0 and in the last slot."""
    assigner = SlotAssigner(KEY, slots, cap)
    base = [rec(t) for t in pool]
    before = assigner.assign(base)
    full = {i for i, s in enumerate(before) if len(s) == cap}
    targets = full | {0, slots - 1}
    found: dict[int, Record] = {}
    i = 0
    while targets - found.keys() and i < 5000:
        r = rec(f"probe-{i}")
        s = assigner.slot_of(r.unit)
        if s in targets and s not in found and r not in base:
            found[s] = r
        i += 1
    for s, r in found.items():
        after = assigner.assign([*base, r])
        assert changed_slots(before, after) <= 1
        assert all(a == b for j, (a, b) in enumerate(zip(before, after, strict=True)) if j != s)


@settings(max_examples=150, deadline=None)
@given(
    users=st.lists(st.tuples(st.sampled_from("uvwxyz"), texts), max_size=40),
    extra_user=st.sampled_from("uvwxyz"),
    extra_texts=st.lists(texts, min_size=1, max_size=4),
    slots=st.integers(1, 6),
    cap=st.integers(1, 6),
)
def test_user_level_all_records_of_a_user_move_one_slot(
    users: list[tuple[str, str]],
    extra_user: str,
    extra_texts: list[str],
    slots: int,
    cap: int,
) -> None:
    assigner = SlotAssigner(KEY, slots, cap)
    base = [rec(t, user=u) for u, t in users if u != extra_user]
    before = assigner.assign(base)
    after = assigner.assign(base + [rec(t, user=extra_user) for t in extra_texts])
    assert changed_slots(before, after) <= 1


def test_slot_is_keyed_and_independent_of_order() -> None:
    records = [rec(f"t{i}") for i in range(50)]
    a = SlotAssigner(KEY, 7, 3).assign(records)
    b = SlotAssigner(KEY, 7, 3).assign(list(reversed(records)))
    c = SlotAssigner(b"z" * 32, 7, 3).assign(records)
    assert a == b
    assert a != c
    unit = records[0].unit
    digest = hmac.new(KEY, b"slot\x00" + unit.encode(), hashlib.sha256).digest()
    assert SlotAssigner(KEY, 7, 3).slot_of(unit) == int.from_bytes(digest, "big") % 7


# --- through the real generation loop -------------------------------------------------------


def _run_prompts(records: list[Record], regime: str, sampler=None) -> list[list[list[int]]]:
    plan = make_plan(
        labels=["A", "B"],
        epsilon=8.0,
        shots=2,
        max_tokens=3,
        regime=regime,
        prompts=3,
        examples_per_prompt=2,
        q=0.5 if regime == "resampled" else None,
        candidates="all",
    )
    engine = FakeEngine()
    gen = DemoGenerator(
        engine, plan, generic_task(["A", "B"]), job_key=KEY, rng=np.random.default_rng(0)
    )
    if sampler is not None:
        gen._poisson_sample = sampler  # type: ignore[method-assign]  # a test double
    # force full-length demonstrations so both runs take the same number of steps
    gen._is_stop = lambda token: False  # type: ignore[method-assign]  # a test double
    gen._select = lambda lp, cand, pub=None: 5  # type: ignore[method-assign]  # a test double
    gen.run(records)
    return [b for b in engine.started if len(b) > 2]  # private batches (public has 1 row/group)


def _prompt_diff(a: list[list[list[int]]], b: list[list[list[int]]]) -> list[int]:
    assert len(a) == len(b)
    return [
        sum(1 for x, y in zip(ba, bb, strict=True) if x != y) for ba, bb in zip(a, b, strict=True)
    ]


@settings(max_examples=40, deadline=None)
@given(
    pool=st.lists(st.tuples(texts, st.sampled_from("AB")), max_size=30, unique=True),
    extra=texts,
    label=st.sampled_from("AB"),
)
def test_fixed_regime_loop_neighbours_differ_in_at_most_one_prompt(
    pool: list[tuple[str, str]], extra: str, label: str
) -> None:
    base = [rec(t, lab) for t, lab in pool if (t, lab) != (extra, label)]
    a = _run_prompts(base, "fixed")
    b = _run_prompts([*base, rec(extra, label)], "fixed")
    # one engine batch holds all groups (labels × shots) of the wave; all of them together
    # may differ in at most one prompt
    assert all(d <= 1 for d in _prompt_diff(a, b))


def _keyed_sampler(step_counter: list[int]):
    """A coupled Poisson sampler for the test: a unit's inclusion at call c depends only on
    (c, unit), so neighbouring pools share every other unit's coin."""

    def sample(units: list[str]) -> list[str]:
        c = step_counter[0]
        step_counter[0] += 1
        return [u for u in units if hashlib.sha256(f"{c}|{u}".encode()).digest()[0] < 128]

    return sample


@settings(max_examples=40, deadline=None)
@given(
    pool=st.lists(st.tuples(texts, st.sampled_from("AB")), max_size=30, unique=True),
    extra=texts,
    label=st.sampled_from("AB"),
)
def test_resampled_regime_loop_neighbours_differ_in_at_most_one_prompt_per_step(
    pool: list[tuple[str, str]], extra: str, label: str
) -> None:
    base = [rec(t, lab) for t, lab in pool if (t, lab) != (extra, label)]
    a = _run_prompts(base, "resampled", _keyed_sampler([0]))
    b = _run_prompts([*base, rec(extra, label)], "resampled", _keyed_sampler([0]))
    # each step's batch holds every live demonstration's M=3 prompts; the shots of one label
    # compose sequentially (shots·T steps are charged), so the invariant is per demonstration
    for ba, bb in zip(a, b, strict=True):
        for g in range(0, len(ba), 3):
            assert sum(1 for x, y in zip(ba[g : g + 3], bb[g : g + 3], strict=True) if x != y) <= 1


def test_undeclared_labels_are_dropped_silently() -> None:
    records = [rec("x1", "A"), rec("secret", "Z")]
    prompts = _run_prompts(records, "fixed")
    engine_text = FakeEngine().tokenize("secret")
    flat = [t for batch in prompts for row in batch for t in row]
    assert not any(flat[i : i + len(engine_text)] == engine_text for i in range(len(flat)))


@pytest.mark.parametrize("regime", ["fixed", "resampled"])
def test_identical_records_are_one_record(regime: str) -> None:
    """A duplicate of a record changes nothing: identical records are deduplicated before
    slotting (one unit, one record)."""
    records = [rec(f"t{i}", "AB"[i % 2]) for i in range(8)]
    sampler = _keyed_sampler([0]) if regime == "resampled" else None
    once = _run_prompts(records, regime, sampler)
    sampler = _keyed_sampler([0]) if regime == "resampled" else None
    twice = _run_prompts(records + records[:3], regime, sampler)
    assert once == twice


def test_user_level_resampled_prompts_hold_their_own_label_only() -> None:
    """At user level a user's records of other labels stay in their own labels' pools."""
    both = [rec("alpha text", "A", user="u1"), rec("beta text", "B", user="u1")]
    plan = make_plan(
        labels=["A", "B"],
        epsilon=8.0,
        max_tokens=2,
        regime="resampled",
        q=1.0,
        prompts=1,
        examples_per_prompt=4,
        candidates="all",
        privacy_unit="user",
    )
    engine = FakeEngine()
    gen = DemoGenerator(engine, plan, generic_task(["A", "B"]), job_key=KEY)
    gen._is_stop = lambda token: False  # type: ignore[method-assign]  # a test double
    gen._select = lambda lp, cand, pub=None: 5  # type: ignore[method-assign]  # a test double
    gen.run(both)
    beta, alpha = engine.tokenize(" beta text"), engine.tokenize(" alpha text")

    def holds(row: list[int], piece: list[int]) -> bool:
        return any(row[i : i + len(piece)] == piece for i in range(len(row)))

    private = [b for b in engine.started if len(b) == 2]  # one row per label per step
    assert private
    for batch in private:
        a_row, b_row = batch
        assert holds(a_row, alpha) and not holds(a_row, beta)
        assert holds(b_row, beta) and not holds(b_row, alpha)
