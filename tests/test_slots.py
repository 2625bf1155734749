"""StateSlots: the per-stream state table of recurrent models (CPU)."""

from __future__ import annotations

import threading

import pytest
import torch

from batching import SlotsExhausted, StateSlots

SHAPES = {"h": (4,), "c": (4,), "ctx": (2, 3)}


def make(capacity: int = 4) -> StateSlots:
    return StateSlots(capacity, SHAPES, device="cpu")


def test_tables_have_capacity_rows():
    s = make(5)
    assert s.capacity == 5 and s.in_use == 0
    assert {k: tuple(t.shape) for k, t in s.tensors.items()} == {
        "h": (5, 4),
        "c": (5, 4),
        "ctx": (5, 2, 3),
    }
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in s.tensors.values())


def test_acquire_release_and_exhaustion():
    s = make(3)
    got = [s.acquire() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and s.in_use == 3
    with pytest.raises(SlotsExhausted, match="3"):
        s.acquire()
    s.release(got[1])
    assert s.in_use == 2
    assert s.acquire() == got[1]  # a freed slot is reused
    with pytest.raises(SlotsExhausted):
        s.acquire()


def test_release_zeroes_rows_and_bumps_generation():
    s = make()
    a, b = s.acquire(), s.acquire()
    s.scatter([a, b], {k: torch.ones(2, *shape) * (i + 1) for i, (k, shape) in enumerate(SHAPES.items())})
    g = s.generation(a)
    s.release(a)
    assert s.generation(a) == g + 1
    for t in s.tensors.values():
        assert torch.count_nonzero(t[a]) == 0
        assert torch.all(t[b] != 0)  # the other stream is untouched
    a2 = s.acquire()
    assert a2 == a
    assert all(torch.count_nonzero(v) == 0 for v in s.gather([a2]).values())


def test_double_release_and_bad_slot_are_errors():
    s = make()
    a = s.acquire()
    s.release(a)
    with pytest.raises(ValueError, match="not in use"):
        s.release(a)
    with pytest.raises(ValueError, match="out of range"):
        s.release(99)
    with pytest.raises(ValueError):
        s.release(s.capacity - 1)  # never acquired


def test_gather_scatter_round_trip():
    s = make(8)
    slots = [s.acquire() for _ in range(5)]
    pick = [slots[3], slots[0], slots[4]]
    vals = {k: torch.randn(3, *shape) for k, shape in SHAPES.items()}
    s.scatter(pick, vals)
    out = s.gather(pick)
    for k in SHAPES:
        assert torch.equal(out[k], vals[k])
    # gather returns copies: mutating them leaves the table alone
    out["h"].fill_(7)
    assert torch.equal(s.gather(pick)["h"], vals["h"])
    # untouched slots stay zero; a tensor index works as well as a list
    rest = s.gather(torch.tensor([slots[1], slots[2]]))
    assert all(torch.count_nonzero(v) == 0 for v in rest.values())


def test_scatter_subset_of_tensors_and_dtype_conversion():
    s = make()
    a = s.acquire()
    s.scatter([a], {"h": torch.arange(4, dtype=torch.float64).unsqueeze(0)})
    assert s.tensors["h"].dtype == torch.float32
    assert torch.equal(s.gather([a])["h"], torch.arange(4.0).unsqueeze(0))
    assert torch.count_nonzero(s.gather([a])["c"]) == 0


def test_scatter_skips_rows_whose_generation_changed():
    s = make()
    a, b = s.acquire(), s.acquire()
    gens = [s.generation(a), s.generation(b)]
    state = s.gather([a, b])  # a batch starts...
    s.release(a)  # ...stream a ends meanwhile...
    a2 = s.acquire()  # ...and a new stream takes the same row
    assert a2 == a
    new = {k: v + 5 for k, v in state.items()}
    s.scatter([a, b], new, generations=gens)  # the stale write-back for a must be skipped
    got = s.gather([a, b])
    for k in SHAPES:
        assert torch.count_nonzero(got[k][0]) == 0, "new owner of the slot got stale state"
        assert torch.equal(got[k][1], new[k][1])


def test_scatter_never_writes_free_rows():
    s = make()
    a, b = s.acquire(), s.acquire()
    s.release(b)
    s.scatter([a, b], {"h": torch.ones(2, 4)})
    assert torch.equal(s.tensors["h"][a], torch.ones(4))
    assert torch.count_nonzero(s.tensors["h"][b]) == 0


def test_scatter_validates_input():
    s = make()
    a, b = s.acquire(), s.acquire()
    with pytest.raises(ValueError, match="duplicate"):
        s.scatter([a, a], {"h": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="shape"):
        s.scatter([a, b], {"h": torch.ones(2, 5)})
    with pytest.raises(KeyError):
        s.scatter([a], {"nope": torch.ones(1, 4)})
    with pytest.raises(ValueError, match="generations"):
        s.scatter([a, b], {"h": torch.ones(2, 4)}, generations=[0])


def test_concurrent_acquire_release_keeps_accounting():
    s = StateSlots(64, {"h": (8,)})
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(300):
                i = s.acquire()
                s.scatter([i], {"h": torch.ones(1, 8)}, generations=[s.generation(i)])
                s.release(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert s.in_use == 0
    assert torch.count_nonzero(s.tensors["h"]) == 0
