"""`korch plan` and the live-cluster check, as data: node types from cluster files, gang placement."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from korch.cluster.plan import (
    NodeType, check_live_cluster, cluster_max_workers, format_plan_table, load_cluster_yaml, node_types,
    plan_stage,
)
from korch.config import DistributedConfig
from korch.errors import UserError

REPO = Path(__file__).resolve().parents[2]
ONPREM = REPO / "cluster" / "onprem.yaml"
AWS = REPO / "cluster" / "aws-gpu.yaml"


def gpu(n: int, per: float = 1.0, cpus: float = 1.0) -> DistributedConfig:
    return DistributedConfig(num_workers=n, use_gpu=True, gpus_per_worker=per, cpus_per_worker=cpus)


def write_job(tmp_path: Path, **stages: DistributedConfig | dict) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("안녕하세요. 한국어 문장입니다.\n" * 10, encoding="utf-8")
    job = {"name": "plan-test", "stages": []}
    for name, dist in stages.items():
        dist = dist.model_dump() if isinstance(dist, DistributedConfig) else dist
        job["stages"].append({"name": name, "task": "mlm", "data": {"inputs": [str(corpus)]}, "distributed": dist})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    return path


# --- node types ------------------------------------------------------------------------------------------

def test_node_types_of_a_cloud_file():
    cluster = load_cluster_yaml(AWS)
    types = {t.name: t for t in node_types(cluster)}
    assert types["head"] == NodeType("head", 8, 0, 1, is_head=True)
    assert types["gpu_a10g_4x"] == NodeType("gpu_a10g_4x", 48, 4, 2)
    assert types["gpu_a100_8x"] == NodeType("gpu_a100_8x", 96, 8, 1)
    assert cluster_max_workers(cluster) == 3


def test_local_provider_reads_sizes_from_the_start_commands():
    cluster = {"provider": {"type": "local", "head_ip": "h", "worker_ips": ["a", "b", "c"]}, "max_workers": 2,
               "head_start_ray_commands": ["ray start --head --num-cpus 4"],
               "worker_start_ray_commands": ["ulimit -n 1; ray start --address=$RAY_HEAD_IP:6379 --num-gpus=2 --num-cpus=8"]}
    head, worker = node_types(cluster)
    assert (head.cpus, head.gpus) == (4, None)
    assert (worker.cpus, worker.gpus, worker.max_nodes) == (8, 2, 2)  # 3 ips, capped by max_workers


def test_a_type_without_its_own_max_workers_takes_the_clusters():
    cluster = {"provider": {"type": "aws"}, "max_workers": 5, "head_node_type": "h",
               "available_node_types": {"h": {"resources": {"CPU": 2}, "node_config": {}},
                                        "w": {"resources": {"CPU": 4, "GPU": 1}, "node_config": {}}}}
    assert {t.name: t.max_nodes for t in node_types(cluster)} == {"h": 1, "w": 5}


@pytest.mark.parametrize("text, message", [
    (None, "does not exist"), ("a: [", "invalid YAML"), ("- 1\n- 2\n", "must be a mapping"),
    ("name: x\nstages: []\n", "not a Ray cluster file"),
])
def test_load_cluster_yaml_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_cluster_yaml(path)


# --- plan_stage ------------------------------------------------------------------------------------------

ONPREM_TYPES = [NodeType("head", 16, 0, 1, is_head=True), NodeType("worker", 48, 6, 1)]


def test_six_gpu_stage_fits_the_onprem_box():
    plan = plan_stage("mlm", gpu(6), ONPREM_TYPES)
    assert plan.error is None and [(p.node_type, p.nodes) for p in plan.fits] == [("worker", 1)]
    assert plan.total_gpus == 6


def test_sixteen_gpu_stage_is_refused_with_the_reason():
    plan = plan_stage("mlm", gpu(16), ONPREM_TYPES)
    assert not plan.fits
    assert "16 workers" in plan.error and "16 GPUs" in plan.error
    assert "worker holds 6/node x 1 node = 6 workers" in plan.error
    assert "head (16 CPU, 0 GPU) cannot hold one worker" in plan.error
    assert "stages.mlm.distributed.num_workers" in plan.error


def test_gang_spreads_over_several_nodes_of_one_type():
    types = node_types(load_cluster_yaml(AWS))
    plan = plan_stage("mlm", gpu(8), types, cluster_max_workers=3)
    fits = {p.node_type: p.nodes for p in plan.fits}
    assert fits == {"gpu_a100_8x": 1, "gpu_a10g_4x": 2}
    assert format_plan_table([plan]).splitlines()[1].endswith("fits: gpu_a100_8x (1 node), gpu_a10g_4x (2 nodes)")


def test_cluster_max_workers_caps_the_spread():
    types = [NodeType("head", 8, 0, 1, is_head=True), NodeType("g", 8, 1, 10)]
    assert plan_stage("s", gpu(4), types, cluster_max_workers=4).fits
    refused = plan_stage("s", gpu(4), types, cluster_max_workers=3)
    assert refused.error and "cluster max_workers 3" in refused.error


def test_cpu_bound_workers_limit_a_gpu_node():
    # 4 GPUs but 6 CPUs: with 2 CPUs per worker only 3 workers fit on one node.
    types = [NodeType("g", 6, 4, 1)]
    assert plan_stage("s", gpu(3, cpus=2), types).fits
    assert plan_stage("s", gpu(4, cpus=2), types).error


def test_fractional_gpus_pack_two_workers_per_gpu():
    plan = plan_stage("s", gpu(12, per=0.5), ONPREM_TYPES)
    assert [(p.node_type, p.nodes, p.workers_per_node) for p in plan.fits] == [("worker", 1, 12)]


def test_cpu_stage_may_use_the_head():
    plan = plan_stage("prep", DistributedConfig(num_workers=4, cpus_per_worker=2), ONPREM_TYPES)
    assert {p.node_type for p in plan.fits} == {"head", "worker"}
    assert plan.gpus_per_worker == 0 and plan.total_gpus == 0


def test_mixed_types_when_no_single_type_holds_the_gang():
    types = [NodeType("a", 8, 4, 1), NodeType("b", 8, 2, 1)]
    plan = plan_stage("s", gpu(6), types)
    assert not plan.fits and plan.error is None
    assert [(p.node_type, p.nodes) for p in plan.mixed] == [("a", 1), ("b", 1)]


def test_unknown_sizes_are_not_an_error():
    types = [NodeType("head", None, None, 1, is_head=True)]
    plan = plan_stage("s", gpu(2), types)
    assert plan.error is None and plan.unknown == ["head"]


def test_plan_table_columns():
    table = format_plan_table([plan_stage("mlm", gpu(6), ONPREM_TYPES), plan_stage("big", gpu(16), ONPREM_TYPES)])
    header, first, second = table.splitlines()
    assert header.split() == ["stage", "workers", "GPU/worker", "CPU/worker", "total", "GPUs", "total", "CPUs", "placement"]
    assert first.split()[:6] == ["mlm", "6", "1", "1", "6", "6"] and first.endswith("fits: worker (1 node)")
    assert second.endswith("DOES NOT FIT")


# --- the CLI ---------------------------------------------------------------------------------------------

def test_korch_plan_refuses_16_gpus_on_onprem(tmp_path, cli):
    job = write_job(tmp_path, prepare=DistributedConfig(num_workers=1), mlm=gpu(16))
    code, out, err = cli("plan", str(job), "--cluster", str(ONPREM))
    assert code == 2
    assert "prepare" in out and "DOES NOT FIT" in out  # the table still prints
    assert err.startswith("korch: error: ") and "stage 'mlm' needs 16 workers" in err
    assert "Traceback" not in err


def test_korch_plan_accepts_6_gpus_and_set_overrides(tmp_path, cli):
    job = write_job(tmp_path, mlm=gpu(16))
    code, out, err = cli("plan", str(job), "--cluster", str(ONPREM), "--set", "stages.mlm.distributed.num_workers=6")
    assert code == 0, err
    assert "fits: worker (1 node)" in out


def test_korch_plan_without_a_cluster_prints_the_sizes(tmp_path, cli):
    code, out, _ = cli("plan", str(write_job(tmp_path, mlm=gpu(2))))
    assert code == 0 and out.splitlines()[1].split()[:5] == ["mlm", "2", "1", "1", "2"]


@pytest.mark.parametrize("cluster", sorted(str(p.relative_to(REPO)) for p in (REPO / "cluster").rglob("*.yaml")))
def test_every_shipped_cluster_file_plans(tmp_path, cli, cluster):
    code, out, err = cli("plan", str(write_job(tmp_path, mlm=gpu(4))), "--cluster", str(REPO / cluster))
    assert code == 0, err
    assert "fits:" in out


def test_korch_plan_missing_cluster_file(tmp_path, cli):
    code, _, err = cli("plan", str(write_job(tmp_path, mlm=gpu(1))), "--cluster", str(tmp_path / "nope.yaml"))
    assert code == 2 and "cluster file does not exist" in err


# --- check_live_cluster ----------------------------------------------------------------------------------

def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    res = {"CPU": cpus, "memory": 1e9}
    if gpus:
        res["GPU"] = gpus
    return {"NodeID": "x", "Alive": alive, "Resources": res}


def totals(nodes):
    out: dict = {}
    for n in nodes:
        if n["Alive"]:
            for k, v in n["Resources"].items():
                out[k] = out.get(k, 0) + v
    return out


def test_live_fits_on_the_nodes_it_has():
    nodes = [node(1), node(6, 6)]
    assert check_live_cluster(gpu(6), totals(nodes), nodes, node_groups=[]) is None


def test_live_fixed_cluster_refuses_what_no_node_can_hold():
    nodes = [node(2)]  # e.g. this laptop: 2 CPUs, no GPU, nothing can join
    message = check_live_cluster(gpu(6), totals(nodes), nodes, node_groups=[])
    assert "needs 6 workers x (1 CPU + 1 GPU)" in message and "can host only 0" in message
    assert "does not autoscale" in message


def test_live_gang_must_fit_per_node_not_just_in_total():
    # 6 GPUs in all, but 3 per node and 2 CPUs each: 4 workers of 1 GPU + 1 CPU fit (2 per node).
    nodes = [node(2, 3), node(2, 3)]
    assert check_live_cluster(gpu(4), totals(nodes), nodes, []) is None
    assert check_live_cluster(gpu(5), totals(nodes), nodes, []) is not None


def test_dead_nodes_do_not_count():
    nodes = [node(1), node(6, 6, alive=False)]
    assert check_live_cluster(gpu(1), totals(nodes), nodes, []) is not None


def test_live_autoscaler_groups_can_make_it_fit():
    nodes = [node(8)]  # a CPU head; GPU workers scale from zero
    groups = [NodeType("gpu_a10g_4x", 48, 4, 2), NodeType("gpu_a100_8x", 96, 8, 1)]
    assert check_live_cluster(gpu(8), totals(nodes), nodes, groups) is None
    message = check_live_cluster(gpu(32), totals(nodes), nodes, groups)
    assert "can add up to 16 more" in message


def test_live_unlimited_group_always_fits():
    nodes = [node(8)]
    assert check_live_cluster(gpu(64), totals(nodes), nodes, [NodeType("g", 8, 8, None)]) is None


def test_live_unknown_autoscaler_never_fails():
    # Node types korch cannot see may still join, so "waiting" is not "impossible".
    nodes = [node(8)]
    assert check_live_cluster(gpu(64), totals(nodes), nodes, node_groups=None) is None


def test_bootstrap_config_gives_the_node_groups(tmp_path, monkeypatch):
    from korch.cluster import live
    from korch.cluster.live import autoscaler_node_groups

    # Only the bootstrap file is under test: a Ray left running by another test must not answer first.
    monkeypatch.setattr(live, "_published_node_groups", lambda: None)
    monkeypatch.setattr(live, "_hand_started", lambda: False)

    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(ONPREM.read_text())
    groups = autoscaler_node_groups(path)
    assert groups == [NodeType("worker", 48, 6, 1)]
    assert autoscaler_node_groups(tmp_path / "missing.yaml") is None
