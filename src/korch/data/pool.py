"""How big a preprocessing actor pool is: its actor count and CPUs per actor, from what the cluster has free.

`data.preprocess_actors` and `data.actor_cpus` win when set. Unset, one single-threaded Kiwi actor runs per
free CPU, so a 64-core node runs ~63 actors instead of 2:

- under 4 free CPUs (a laptop), actors take half a CPU each: on a 2-CPU machine two actors then leave a
  logical CPU for Ray Data's own tasks (at 1 CPU each they would wait for CPUs forever);
- from 4 free CPUs, actors take a whole CPU each and one CPU is left to the driver, which packs and writes;
- never more actors than chunks of work, nor than free memory holds at ~0.5 GB each (Kiwi's ~260 MB model
  plus the worker process).

Under 4 free CPUs on a one-node cluster that is this machine (a laptop, a CI box), with neither
`preprocess_actors` nor `actor_cpus` set, there is no pool at all: the driver runs Kiwi itself with a thread per
free CPU (`inline_kiwi_threads`). There, actors only cost: each is a new worker process and another Kiwi model
load (~2 s and ~260 MB each) that keep every core busy before the first document, while one Kiwi with two
threads does the same work per second. Measured on 2 cores, the bench corpus (1,493 documents), two runs each:
19.7 and 22.4 s end to end against 25.1 and 26.2 s for two half-CPU actors; 3.1 s to the first documents
against 8.0 s.

`pool_shape` and `inline_kiwi_threads` are pure functions of those numbers (tested as data);
`cluster_pool_shape` and `pipeline_kiwi_threads` read them from Ray.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from typing import NamedTuple

ACTOR_MEMORY_BYTES = 512 * 2**20
"""What one Kiwi actor holds: Kiwi's model (~260 MB) and a Ray worker process."""
WHOLE_CPU_FROM = 4.0
"""Free CPUs from which actors take a whole CPU each (and one is left to the driver)."""


class PoolShape(NamedTuple):
    actors: int
    actor_cpus: float
    kiwi_threads: int


def pool_shape(free_cpus: float, actors: int | None = None, actor_cpus: float | None = None,
               chunks: int | None = None, free_memory_bytes: float | None = None,
               kiwi_threads: int | None = None) -> PoolShape:
    """(actors, CPUs per actor) for a Kiwi pool. Set values are kept as they are; unset ones follow the rules
    in the module docstring."""
    if actor_cpus is None:
        actor_cpus = 1.0 if free_cpus >= WHOLE_CPU_FROM else 0.5
    if actors is None:
        usable = free_cpus - 1.0 if free_cpus >= WHOLE_CPU_FROM else free_cpus
        actors = max(1, math.floor(usable / max(actor_cpus, 1.0)))
        if chunks is not None:
            actors = min(actors, max(1, chunks))
        if free_memory_bytes is not None:
            actors = min(actors, max(1, int(free_memory_bytes // ACTOR_MEMORY_BYTES)))
    if kiwi_threads is None:
        kiwi_threads = max(1, math.floor(actor_cpus))
    return PoolShape(int(actors), float(actor_cpus), int(kiwi_threads))


def inline_kiwi_threads(free_cpus: float, one_local_node: bool, actors: int | None = None,
                       actor_cpus: float | None = None, kiwi_threads: int | None = None) -> int | None:
    """Kiwi threads for preprocessing in the driver itself, or None for an actor pool (module docstring)."""
    if actors is not None or actor_cpus is not None or not one_local_node or free_cpus >= WHOLE_CPU_FROM:
        return None
    return kiwi_threads or max(1, math.floor(free_cpus))


def _inline_threads_here(data) -> int | None:
    """`inline_kiwi_threads` on this machine alone (no Ray running: korch would start one here)."""
    return inline_kiwi_threads(float(os.cpu_count() or 1), True, data.preprocess_actors, data.actor_cpus,
                               data.kiwi_threads)


def inline_here(data) -> bool:
    """True when, with no Ray running, korch preprocesses `data` in the driver (no pool) on this machine."""
    return _inline_threads_here(data) is not None


def pipeline_kiwi_threads(data) -> int | None:
    """`inline_kiwi_threads` for this machine or the connected Ray cluster; reads Ray only if it is running."""
    ray = sys.modules.get("ray")  # a Ray never imported is not running: spare the driver's Kiwi its ~0.5 s import
    if ray is None or not ray.is_initialized():
        return _inline_threads_here(data)
    if data.preprocess_actors is not None or data.actor_cpus is not None:
        return None  # set values ask for a pool
    cpus, one_local_node = _free_cpus()
    return inline_kiwi_threads(cpus, one_local_node, kiwi_threads=data.kiwi_threads)


def local_pool_shape(data) -> PoolShape:
    """The pool a job's data stage gets on this machine alone (how big a local Ray korch starts must be)."""
    return pool_shape(float(os.cpu_count() or 1), data.preprocess_actors, data.actor_cpus,
                      kiwi_threads=data.kiwi_threads)


def cluster_pool_shape(data, chunks: int | None = None) -> PoolShape:
    """The pool for `data` (a DataConfig) on the connected Ray cluster, sized by its free CPUs and memory now.

    A korch-started local Ray may declare more logical CPUs than the machine has (room for Ray Data's tasks
    beside the train workers); Kiwi actors are CPU-bound, so on a one-node cluster on this host the machine's
    own core count caps the free CPUs.
    """
    import ray

    cpus, _ = _free_cpus()
    return pool_shape(cpus, data.preprocess_actors, data.actor_cpus, chunks, ray.available_resources().get("memory"),
                      data.kiwi_threads)


def _free_cpus() -> tuple[float, bool]:
    """Free CPUs of the connected Ray cluster, and whether it is one node on this host (then capped by its cores)."""
    import ray

    cpus = float(ray.available_resources().get("CPU", 0.0))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    one_local_node = len(nodes) == 1 and nodes[0].get("NodeManagerHostname") == socket.gethostname()
    if one_local_node:
        cpus = min(cpus, float(os.cpu_count() or 1))
    return cpus, one_local_node
