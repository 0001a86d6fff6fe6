"""The bounded process pool behind ``imag import`` and ``imag transcode``:
every item handled once, the input read no further ahead than the bound,
errors and Ctrl-C stop the run with the workers shut down."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from archive.pool import BoundedPool

_greeting = ""


def _init(greeting: str) -> None:
    global _greeting
    _greeting = greeting


def _square(n: int) -> int:
    return n * n


def _greet(n: int) -> str:
    return f"{_greeting} {n}"


def _fail_on_three(n: int) -> int:
    if n == 3:
        raise ValueError("item 3 is bad")
    return n


def _mark(item: tuple[str, int]) -> int:
    folder, n = item
    Path(folder, str(n)).touch()
    return n


def _interrupted_then_done(n: int) -> int:
    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in a terminal does to every worker
    return n


def test_every_item_is_handled_once_with_its_result_in_the_submitting_process() -> None:
    handled: list[tuple[int, int]] = []
    with BoundedPool(2, per_worker=2) as pool:
        for n in range(40):
            pool.submit(_square, n, lambda result, n=n: handled.append((n, result)))
    assert sorted(handled) == [(n, n * n) for n in range(40)]


def test_the_initializer_runs_in_every_worker_before_its_items() -> None:
    results: list[str] = []
    with BoundedPool(2, initializer=_init, initargs=("hello",)) as pool:
        for n in range(6):
            pool.submit(_greet, n, results.append)
    assert sorted(results) == [f"hello {n}" for n in range(6)]


def test_the_items_are_read_no_further_ahead_than_the_bound() -> None:
    handled = 0
    ahead: list[int] = []

    def items() -> Iterator[int]:
        for n in range(60):
            ahead.append(n - handled)  # items taken but not yet handled
            yield n

    def count(_: int) -> None:
        nonlocal handled
        handled += 1

    with BoundedPool(2, per_worker=2) as pool:
        for n in items():
            pool.submit(_square, n, count)
            assert pool.in_flight <= pool.limit == 4
    assert handled == 60
    assert max(ahead) == pool.limit


def test_a_failing_item_stops_the_run_and_what_was_not_started_is_cancelled() -> None:
    taken = 0

    def items() -> Iterator[int]:
        nonlocal taken
        for n in range(1000):
            taken += 1
            yield n

    handled: list[int] = []
    with pytest.raises(ValueError, match="item 3 is bad"), BoundedPool(2, per_worker=2) as pool:
        for n in items():
            pool.submit(_fail_on_three, n, handled.append)
    assert 3 not in handled
    assert taken < 1000


def test_ctrl_c_in_the_parent_cancels_queued_items_and_shuts_the_workers_down(
    tmp_path: Path,
) -> None:
    workers: set[int] = set()

    def interrupt(_: int) -> None:
        workers.update(p.pid for p in multiprocessing.active_children())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), BoundedPool(2, per_worker=2) as pool:
        for n in range(100):
            pool.submit(_mark, (str(tmp_path), n), interrupt)
    assert workers
    assert not [p for p in multiprocessing.active_children() if p.pid in workers]
    assert len(list(tmp_path.iterdir())) <= pool.limit  # only what was submitted ever ran


def test_ctrl_c_reaching_the_workers_does_not_fail_the_items_they_work_on() -> None:
    results: list[int] = []
    with BoundedPool(2) as pool:
        for n in range(4):
            pool.submit(_interrupted_then_done, n, results.append)
    assert sorted(results) == [0, 1, 2, 3]
