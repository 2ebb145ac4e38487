"""The thread policy (one function) and the facts it reads: affinity, quota, idle cores."""

from pathlib import Path

import pytest

from trainer import threads
from trainer.threads import choose_threads, numbers_depend_on_threads


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    def set_machine(cores: int, idle: float) -> None:
        monkeypatch.setattr(threads, "usable_cores", lambda: cores)
        monkeypatch.setattr(threads, "idle_cores", lambda seconds=0.2: idle)
    return set_machine


def test_a_request_wins(machine) -> None:  # noqa: ANN001
    machine(8, 0.0)
    assert choose_threads(3) == (3, "3 threads, as asked")
    with pytest.raises(ValueError):
        choose_threads(0)


def test_cores_are_shared_by_jobs_and_capped_by_a_scheduler(machine) -> None:  # noqa: ANN001
    machine(8, 8.0)
    assert choose_threads(jobs=2)[0] == 4
    assert choose_threads(jobs=16)[0] == 1
    n, why = choose_threads(limit=2)
    assert n == 2 and "at most 2 threads for this job" in why


def test_busy_cores_are_left_out_only_where_the_numbers_do_not_depend_on_the_count(machine) -> None:  # noqa: ANN001
    machine(8, 2.6)
    n, why = choose_threads()
    assert n == 2 and "only 2.6 left idle" in why
    n, why = choose_threads(numbers_depend_on_threads=True)
    assert n == 8 and "depend on its thread count" in why
    machine(2, 0.1)
    assert choose_threads()[0] == 1  # at least one


def test_which_runs_depend_on_the_thread_count() -> None:
    assert not numbers_depend_on_threads("cpu", gemm_thread_independent=True)
    assert numbers_depend_on_threads("cpu", gemm_thread_independent=False)
    assert not numbers_depend_on_threads("cuda", gemm_thread_independent=False)


def test_idle_time_and_quota_are_read_from_the_kernel(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 0 0 0 0\ncpu1 5 0 5 40 2 0 0 1 0 0\nintr 1\n")
    assert threads._cpu_times(stat) == {0: [5, 0, 5, 40, 0, 0, 0, 0], 1: [5, 0, 5, 40, 2, 0, 0, 1]}
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert threads._cgroup_quota(quota) == 1.5
    quota.write_text("max 100000\n")
    assert threads._cgroup_quota(quota) is None
    assert 0.0 <= threads.idle_cores(0.05) <= threads.usable_cores()
