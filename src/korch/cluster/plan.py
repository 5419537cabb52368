"""Will a stage's worker gang fit a cluster? Pure functions over cluster YAMLs and live-cluster snapshots.

`korch plan JOB.yaml --cluster cluster/onprem.yaml` prints one row per stage and exits 2 when a stage can
never be placed; `korch run` calls `check_live_cluster` before each stage so it fails fast instead of waiting
forever for resources (a Ray Train gang that cannot be placed just sits in PENDING).

The placement model is Ray Train's: a stage is `num_workers` bundles of `{CPU: cpus_per_worker,
GPU: gpus_per_worker}` reserved together (a placement group, PACK strategy), so bundles may spread over
several nodes, but every bundle must fit whole on one node.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from korch.errors import UserError

# Resource amounts are floats (gpus_per_worker: 0.5 is legal); this absorbs float noise such as 3 * 0.1.
_EPS = 1e-9


@dataclass(frozen=True)
class NodeType:
    """One kind of node a cluster has or can add."""

    name: str
    cpus: float | None
    """Logical CPUs per node; None when the cluster file does not say (Ray would auto-detect them)."""
    gpus: float | None
    """GPUs per node; None when unknown."""
    max_nodes: int | None
    """How many nodes of this type the cluster can hold at once; None is unlimited."""
    is_head: bool = False


@dataclass(frozen=True)
class Placement:
    node_type: str
    nodes: int
    workers_per_node: int


@dataclass(frozen=True)
class StagePlan:
    stage: str
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    """0 when the stage does not use GPUs."""
    fits: list[Placement] = field(default_factory=list)
    """Node types that can host the whole gang on their own, smallest number of nodes first."""
    mixed: list[Placement] = field(default_factory=list)
    """When no single type fits but several together do: the nodes used per type."""
    unknown: list[str] = field(default_factory=list)
    """Node types whose resources the cluster file leaves to auto-detection."""
    error: str | None = None

    @property
    def total_gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker

    @property
    def total_cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker


# --- cluster files ---------------------------------------------------------------------------------------

def load_cluster_yaml(path: str | Path) -> dict:
    """Read a cluster-launcher YAML (or a KubeRay RayCluster/RayJob manifest) as a dict."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: cluster file does not exist; pass e.g. --cluster cluster/onprem.yaml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the cluster file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{path}: {where}invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a cluster file must be a mapping (a Ray cluster-launcher YAML or a KubeRay manifest)")
    if "provider" not in data and data.get("kind") not in ("RayCluster", "RayJob"):
        raise UserError(f"{path}: not a Ray cluster file: it has neither `provider:` (cluster launcher) "
                        "nor `kind: RayCluster`/`kind: RayJob` (KubeRay)")
    return data


def node_types(cluster: dict) -> list[NodeType]:
    """The node types a cluster file declares: cluster launcher (cloud or `local`) or KubeRay."""
    if cluster.get("kind") in ("RayCluster", "RayJob"):
        return _kuberay_node_types(cluster)
    provider = cluster.get("provider") or {}
    cluster_max = cluster.get("max_workers")
    if provider.get("type") == "local":
        return _local_node_types(cluster, provider, cluster_max)
    head = cluster.get("head_node_type")
    types = []
    for name, spec in (cluster.get("available_node_types") or {}).items():
        resources = spec.get("resources") or {}
        if name == head:
            max_nodes: int | None = 1
        else:
            # A type's own max_workers defaults to the cluster's (Ray's fill_node_type_min_max_workers).
            own = spec.get("max_workers", cluster_max)
            max_nodes = _min_known(own, cluster_max)
        types.append(NodeType(name, _num(resources.get("CPU")), _num(resources.get("GPU")), max_nodes, name == head))
    return types


def _local_node_types(cluster: dict, provider: dict, cluster_max: int | None) -> list[NodeType]:
    # The `local` provider forbids available_node_types (Ray fills in one internal type), so the only place a
    # file states the machines' sizes is `ray start --num-cpus/--num-gpus` in the start commands. onprem.yaml
    # sets them explicitly for that reason.
    head_cpus, head_gpus = _start_flags(cluster.get("head_start_ray_commands") or [])
    worker_cpus, worker_gpus = _start_flags(cluster.get("worker_start_ray_commands") or [])
    types = [NodeType("head", head_cpus, head_gpus, 1, is_head=True)]
    if "worker_ips" in provider:
        count = _min_known(len(provider.get("worker_ips") or []), cluster_max)
    else:  # coordinator-managed: the cluster's max_workers is the only bound
        count = cluster_max
    if count != 0:
        types.append(NodeType("worker", worker_cpus, worker_gpus, count))
    return types


def _kuberay_node_types(manifest: dict) -> list[NodeType]:
    spec = manifest.get("spec") or {}
    if manifest.get("kind") == "RayJob":
        spec = spec.get("rayClusterSpec") or {}
    head = spec.get("headGroupSpec") or {}
    types = [NodeType("head", *_pod_resources(head), 1, is_head=True)]
    for group in spec.get("workerGroupSpecs") or []:
        cpus, gpus = _pod_resources(group)
        types.append(NodeType(group.get("groupName", "workers"), cpus, gpus,
                              group.get("maxReplicas", group.get("replicas"))))
    return types


def _pod_resources(group: dict) -> tuple[float | None, float | None]:
    # rayStartParams win (that is what Ray advertises); otherwise the Ray container's limits, as KubeRay does.
    params = group.get("rayStartParams") or {}
    cpus, gpus = _num(params.get("num-cpus")), _num(params.get("num-gpus"))
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    if cpus is None and "cpu" in limits:
        cpus = _k8s_cpu(limits["cpu"])
    if gpus is None:
        gpus = _num(limits.get("nvidia.com/gpu", 0))
    return cpus, gpus


def _k8s_cpu(value: Any) -> float | None:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return _num(text)


def _start_flags(commands: Iterable[str]) -> tuple[float | None, float | None]:
    cpus = gpus = None
    for command in commands:
        if "ray start" not in command:
            continue
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        for i, word in enumerate(words):
            for flag in ("--num-cpus", "--num-gpus"):
                value = None
                if word.startswith(flag + "="):
                    value = word.split("=", 1)[1]
                elif word == flag and i + 1 < len(words):
                    value = words[i + 1]
                if value is not None:
                    if flag == "--num-cpus":
                        cpus = _num(value)
                    else:
                        gpus = _num(value)
    return cpus, gpus


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _min_known(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


# --- planning --------------------------------------------------------------------------------------------

def worker_shape(distributed) -> tuple[float, float]:
    """(CPUs, GPUs) one Ray Train worker reserves for a `DistributedConfig`."""
    return float(distributed.cpus_per_worker), float(distributed.gpus_per_worker) if distributed.use_gpu else 0.0


def workers_per_node(cpus: float | None, gpus: float | None, cpu_need: float, gpu_need: float) -> int | None:
    """How many worker bundles fit on one node; None when the node's size is unknown."""
    if cpus is None or (gpu_need > 0 and gpus is None):
        return None
    fits = math.floor((cpus + _EPS) / cpu_need) if cpu_need > 0 else math.inf
    if gpu_need > 0:
        fits = min(fits, math.floor(((gpus or 0) + _EPS) / gpu_need))
    return int(min(fits, 10**6))


def plan_stage(name: str, distributed, types: list[NodeType], cluster_max_workers: int | None = None) -> StagePlan:
    """Which node types can host the stage's whole worker gang.

    A type fits when `ceil(num_workers / workers_per_node)` nodes of it are allowed (the head type is one node;
    a worker type is bounded by its `max_workers` and the cluster's `max_workers`). When no single type fits,
    types are combined (largest per-node capacity first), still within the cluster's `max_workers`.
    """
    cpu_need, gpu_need = worker_shape(distributed)
    n = int(distributed.num_workers)
    fits, unknown, capacity = [], [], []
    for t in types:
        per_node = workers_per_node(t.cpus, t.gpus, cpu_need, gpu_need)
        if per_node is None:
            unknown.append(t.name)
            continue
        if per_node == 0:
            continue
        nodes = math.ceil(n / per_node)
        allowed = t.max_nodes if t.max_nodes is not None else math.inf
        if not t.is_head and cluster_max_workers is not None:
            allowed = min(allowed, cluster_max_workers)
        if nodes <= allowed:
            fits.append(Placement(t.name, nodes, min(per_node, n)))
        capacity.append((per_node, allowed, t))
    fits.sort(key=lambda p: (p.nodes, p.node_type))
    plan = dict(stage=name, num_workers=n, cpus_per_worker=cpu_need, gpus_per_worker=gpu_need, unknown=unknown)
    if fits:
        return StagePlan(fits=fits, **plan)
    mixed = _mixed_placement(n, capacity, cluster_max_workers)
    if mixed:
        return StagePlan(mixed=mixed, **plan)
    if unknown:
        # Some node sizes are left to Ray's auto-detection: the stage may fit there, so this is not an error.
        return StagePlan(**plan)
    return StagePlan(error=_no_fit_message(name, n, cpu_need, gpu_need, types, capacity, cluster_max_workers), **plan)


def _mixed_placement(n: int, capacity: list, cluster_max_workers: int | None) -> list[Placement]:
    remaining, worker_nodes_left = n, cluster_max_workers if cluster_max_workers is not None else math.inf
    used = []
    for per_node, allowed, t in sorted(capacity, key=lambda c: (-c[0], c[2].name)):
        limit = allowed if t.is_head else min(allowed, worker_nodes_left)
        if limit <= 0 or remaining <= 0:
            continue
        nodes = min(math.ceil(remaining / per_node), limit)
        nodes = int(nodes)
        used.append(Placement(t.name, nodes, per_node))
        remaining -= nodes * per_node
        if not t.is_head:
            worker_nodes_left -= nodes
    return used if remaining <= 0 and len(used) > 1 else []


def _fmt(x: float) -> str:
    return f"{x:g}"


def _no_fit_message(name, n, cpu_need, gpu_need, types, capacity, cluster_max_workers) -> str:
    shape = f"{_fmt(cpu_need)} CPU" + (f" + {_fmt(gpu_need)} GPU" if gpu_need else "")
    total = f"{_fmt(n * gpu_need)} GPUs" if gpu_need else f"{_fmt(n * cpu_need)} CPUs"
    reasons = []
    by_name = {t.name: (per_node, allowed) for per_node, allowed, t in capacity}
    for t in types:
        if t.name not in by_name:
            size = f"{_fmt(t.cpus or 0)} CPU, {_fmt(t.gpus or 0)} GPU"
            reasons.append(f"{t.name} ({size}) cannot hold one worker")
        else:
            per_node, allowed = by_name[t.name]
            reasons.append(f"{t.name} holds {per_node}/node x {_fmt(allowed)} node{'s' if allowed != 1 else ''}"
                           f" = {_fmt(per_node * allowed)} workers")
    cap = f" (cluster max_workers {cluster_max_workers})" if cluster_max_workers is not None else ""
    return (f"stage '{name}' needs {n} workers x ({shape}) = {total} at once, and no node type{cap} can host "
            f"that gang: {'; '.join(reasons)}. Lower stages.{name}.distributed.num_workers or "
            f"gpus_per_worker/cpus_per_worker, or use a bigger cluster")


def format_plan_table(plans: list[StagePlan]) -> str:
    """A fixed-width table, one row per stage."""
    header = ("stage", "workers", "GPU/worker", "CPU/worker", "total GPUs", "total CPUs", "placement")
    rows = [header]
    for p in plans:
        rows.append((p.stage, str(p.num_workers), _fmt(p.gpus_per_worker), _fmt(p.cpus_per_worker),
                     _fmt(p.total_gpus), _fmt(p.total_cpus), describe_placement(p)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(line.rstrip() for line in lines)


def describe_placement(p: StagePlan) -> str:
    def one(pl: Placement) -> str:
        return f"{pl.node_type} ({pl.nodes} node{'s' if pl.nodes != 1 else ''})"

    if p.error:
        return "DOES NOT FIT"
    if p.fits:
        text = "fits: " + ", ".join(one(pl) for pl in p.fits)
    elif p.mixed:
        text = "fits across: " + " + ".join(one(pl) for pl in p.mixed)
    else:
        text = "unknown"
    if p.unknown:
        text += f" (size unknown: {', '.join(p.unknown)})"
    return text


def plan_job(job, types: list[NodeType] | None, cluster_max_workers: int | None = None) -> list[StagePlan]:
    """One `StagePlan` per stage. Without a cluster (`types` None) every stage gets an empty placement."""
    plans = []
    for stage in job.stages:
        if types is None:
            cpu, gpu = worker_shape(stage.distributed)
            plans.append(StagePlan(stage.name, stage.distributed.num_workers, cpu, gpu))
        else:
            plans.append(plan_stage(stage.name, stage.distributed, types, cluster_max_workers))
    return plans


def cluster_max_workers(cluster: dict) -> int | None:
    """The cluster-wide cap on worker nodes (cluster launcher `max_workers`); KubeRay has none."""
    value = cluster.get("max_workers")
    return int(value) if isinstance(value, int) else None


# --- live cluster ----------------------------------------------------------------------------------------

def check_live_cluster(distributed, cluster_resources: dict, nodes: list[dict],
                       node_groups: list[NodeType] | None = None) -> str | None:
    """An error message when the stage's gang can never be placed on this cluster, else None.

    `cluster_resources` and `nodes` are `ray.cluster_resources()` and `ray.nodes()`. `node_groups` says what
    an autoscaler may add (see `korch.cluster.live.autoscaler_node_groups`):

    - the gang fits on the alive nodes' *total* resources (busy or not): None, Ray will place it eventually;
    - `node_groups` is a list: the cluster can grow to those node types, each up to its `max_nodes`
      (`[]` means a fixed cluster). Error only when the alive nodes plus every group at its maximum still
      cannot host the gang. This over-counts (a running node is counted again in its group), on purpose:
      korch fails only when the gang is impossible, never when it is merely waiting for a scale-up;
    - `node_groups` is None: the cluster may autoscale with node types korch cannot see (Ray's v1
      autoscaler does not publish them). korch then only fails when it is impossible whatever nodes join:
      never for lack of capacity, since any node could join. Ray Train makes the same call (it skips its
      own check when no autoscaler config is published).
    """
    cpu_need, gpu_need = worker_shape(distributed)
    n = int(distributed.num_workers)
    alive = [node for node in nodes if node.get("Alive", node.get("alive", True))]
    live_capacity = 0
    for node in alive:
        res = node.get("Resources") or node.get("resources_total") or {}
        per = workers_per_node(float(res.get("CPU", 0)), float(res.get("GPU", 0)), cpu_need, gpu_need) or 0
        live_capacity += per
    if live_capacity >= n:
        return None
    if node_groups is None:
        return None
    group_capacity: float = 0
    for group in node_groups:
        per = workers_per_node(group.cpus or 0, group.gpus or 0, cpu_need, gpu_need) or 0
        if per and group.max_nodes is None:
            return None  # an unlimited group can always add enough nodes
        group_capacity += per * (group.max_nodes or 0)
    if live_capacity + group_capacity >= n:
        return None
    shape = f"{_fmt(cpu_need)} CPU" + (f" + {_fmt(gpu_need)} GPU" if gpu_need else "")
    have = ", ".join(f"{_fmt(float(cluster_resources.get(k, 0)))} {k}" for k in ("CPU", "GPU"))
    grow = (f"; the autoscaler can add up to {_fmt(group_capacity)} more such workers"
            if node_groups else "; the cluster does not autoscale")
    return (f"the stage needs {n} workers x ({shape}) placed together, but the live cluster ({len(alive)} "
            f"node{'s' if len(alive) != 1 else ''}, {have} in all) can host only {live_capacity} of them"
            f"{grow}. Lower distributed.num_workers / gpus_per_worker / cpus_per_worker, or use a bigger cluster")

