"""Ray Train configs as pure functions of the `distributed` section."""

from __future__ import annotations

from korch.config import DistributedConfig


def worker_resources(distributed: DistributedConfig) -> dict[str, float]:
    resources = {"CPU": distributed.cpus_per_worker}
    if distributed.use_gpu:
        resources["GPU"] = distributed.gpus_per_worker
    return resources


def build_scaling_config(distributed: DistributedConfig):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=distributed.num_workers, use_gpu=distributed.use_gpu,
                         resources_per_worker=worker_resources(distributed))


def build_failure_config(distributed: DistributedConfig):
    from ray.train import FailureConfig

    return FailureConfig(max_failures=distributed.max_failures)


def resolve_backend(distributed: DistributedConfig) -> str:
    if distributed.backend != "auto":
        return distributed.backend
    return "nccl" if distributed.use_gpu else "gloo"


def build_torch_config(distributed: DistributedConfig):
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=resolve_backend(distributed))
