"""Pool sizing as data: what korch.data.pool gives for a laptop, a big node, and set values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from korch.data.pool import ACTOR_MEMORY_BYTES, inline_kiwi_threads, pool_shape


@pytest.mark.parametrize("free_cpus,expected", [
    (1.0, (1, 0.5, 1)),    # one core: one actor at half a CPU
    (2.0, (2, 0.5, 1)),    # a 2-core laptop: two half-CPU actors, a logical CPU left for Ray Data's tasks
    (3.0, (3, 0.5, 1)),
    (4.0, (3, 1.0, 1)),    # from 4 CPUs: whole CPUs, one left to the driver
    (16.0, (15, 1.0, 1)),
    (64.0, (63, 1.0, 1)),  # a 64-core node runs 63 single-threaded Kiwi actors, not 2
])
def test_unset_pool_follows_the_free_cpus(free_cpus, expected):
    assert tuple(pool_shape(free_cpus)) == expected


def test_set_values_are_kept_whatever_is_free():
    assert tuple(pool_shape(64.0, actors=2, actor_cpus=0.5)) == (2, 0.5, 1)
    assert tuple(pool_shape(2.0, actors=4)) == (4, 0.5, 1)
    # Wider actors run one Kiwi thread per whole CPU (fewer ~260 MB Kiwi models for the same cores).
    assert tuple(pool_shape(64.0, actor_cpus=4.0)) == (15, 4.0, 4)
    assert tuple(pool_shape(64.0, actor_cpus=4.0, kiwi_threads=2)) == (15, 4.0, 2)


def test_work_and_memory_cap_the_actor_count():
    assert pool_shape(64.0, chunks=5).actors == 5
    assert pool_shape(64.0, chunks=0).actors == 1
    assert pool_shape(64.0, free_memory_bytes=10 * ACTOR_MEMORY_BYTES + 1).actors == 10
    assert pool_shape(64.0, actors=40, chunks=5).actors == 40  # a set count is the user's call


@pytest.mark.parametrize("free_cpus,one_local_node,expected", [
    (1.0, True, 1),       # a 1-core box: the driver's Kiwi, one thread
    (2.0, True, 2),       # a 2-core laptop or CI: the driver's Kiwi with two threads, no actors to start
    (3.5, True, 3),
    (4.0, True, None),    # from 4 free CPUs an actor pool pays for its start-up
    (2.0, False, None),   # a cluster of several nodes (or elsewhere): actors spread over the nodes
])
def test_small_local_machines_preprocess_in_the_driver(free_cpus, one_local_node, expected):
    assert inline_kiwi_threads(free_cpus, one_local_node) == expected


def test_set_pool_values_always_ask_for_actors():
    assert inline_kiwi_threads(2.0, True, actors=2) is None
    assert inline_kiwi_threads(2.0, True, actor_cpus=0.5) is None
    assert inline_kiwi_threads(2.0, True, kiwi_threads=1) == 1  # the thread count alone keeps the driver mode


def test_inline_here_is_the_driver_mode_on_this_machine_without_ray(monkeypatch, corpus_dir):
    from korch.config import DataConfig
    from korch.data.pool import inline_here

    data = DataConfig(inputs=[str(corpus_dir)])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert inline_here(data)
    assert not inline_here(data.model_copy(update={"preprocess_actors": 2}))
    assert not inline_here(data.model_copy(update={"actor_cpus": 0.5}))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert not inline_here(data)


def test_choosing_the_drivers_kiwi_does_not_import_ray(corpus_dir):
    """`korch data prepare` on a laptop never needs Ray; importing it alone costs ~0.5 s of a ~20 s run."""
    code = ("import sys; from korch.config import DataConfig; from korch.data.pool import pipeline_kiwi_threads; "
            f"threads = pipeline_kiwi_threads(DataConfig(inputs=[{str(corpus_dir)!r}], kiwi_threads=2)); "
            "print(threads, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "False"]
