"""Read the live cluster's shape (needs a connected Ray) and feed it to the pure check in `plan.py`.

`korch run` calls `check_stage_fits(stage.distributed, started_ray=...)` after connecting to Ray and before
each stage; a non-None result is the message to fail with (`raise UserError(message)`).
"""

from __future__ import annotations

import os
from pathlib import Path

from korch.cluster.plan import NodeType, check_live_cluster, node_types

# `ray up` starts the head with `--autoscaling-config=~/ray_bootstrap_config.yaml`, and a job's driver runs
# on the head (korch submit declares no entrypoint resources, which pins it there), so this file tells the
# driver which node types the autoscaler may add.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def autoscaler_node_groups(bootstrap_config: str | os.PathLike = BOOTSTRAP_CONFIG) -> list[NodeType] | None:
    """Node types the cluster may add, or None when korch cannot tell.

    1. KubeRay and Ray's v2 autoscaler publish their node groups to the GCS (Ray Train's own
       "insufficient cluster resources" check reads the same thing).
    2. On a `ray up` head, the launcher's config sits at `~/ray_bootstrap_config.yaml`.
    3. A hand-started cluster (`ray start` on each machine, `ray.cluster_utils.Cluster`): Ray names every
       node's type `node_<node id>` when no autoscaler launched it, so nothing can join: `[]`.
    Otherwise None: something korch cannot see may add nodes.
    """
    groups = _published_node_groups()
    if groups is not None:
        return groups
    path = Path(bootstrap_config).expanduser()
    if path.is_file():
        import yaml

        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
            types = node_types(config) if isinstance(config, dict) else []
        except Exception:
            return None
        # A type whose size Ray auto-detects could be anything: then korch cannot rule a gang out.
        if types and all(t.cpus is not None and t.gpus is not None for t in types):
            return [t for t in types if not t.is_head]
        return None
    return [] if _hand_started() else None


def _hand_started() -> bool:
    import ray

    if not ray.is_initialized():  # get_runtime_context() would start a local Ray
        return False
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # not connected, or the private API moved: unknown
        return False
    nodes = list(status.active_nodes) + list(status.idle_nodes)
    if not nodes or status.pending_launches or status.pending_nodes:
        return False
    # The read-only provider's anonymous type name (ray.autoscaler._private.util.format_readonly_node_type).
    return all(n.ray_node_type_name == f"node_{n.node_id}" for n in nodes)


def _published_node_groups() -> list[NodeType] | None:
    import ray

    if not ray.is_initialized():  # never start a Ray just to ask
        return None
    try:
        from ray._private import state

        config = state.state.get_cluster_config()
    except Exception:  # private API: if it moves, fall back to "unknown", which never fails a stage
        return None
    if config is None or not config.node_group_configs:
        return None
    groups = []
    for group in config.node_group_configs:
        res = dict(group.resources)
        max_nodes = None if group.max_count == -1 else int(group.max_count)
        groups.append(NodeType(group.name or "group", float(res.get("CPU", 0)), float(res.get("GPU", 0)), max_nodes))
    return groups


def check_stage_fits(distributed, started_ray: bool = False) -> str | None:
    """`check_live_cluster` on the cluster Ray is connected to.

    `started_ray`: korch started this Ray itself (`ray.init()` without an address), so nothing can join it.
    """
    import ray

    groups = [] if started_ray else autoscaler_node_groups()
    return check_live_cluster(distributed, ray.cluster_resources(), ray.nodes(), groups)
