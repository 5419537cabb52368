"""The line a failed stage prints names the rank that died, not the collateral errors of the ranks that outlived
it; the same Ray exception types Train V2 raises, built in-process."""

from __future__ import annotations

from ray.exceptions import ActorDiedError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from korch.train.failure import FAILURE_FILE, describe_failure, write_failure

GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:4994. This is typically caused by a remote worker crashing.")


def _dead_worker(exit_type: str, detail: str) -> WorkerHealthCheckFailedError:
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    context = ActorDiedErrorContext(class_name="RayTrainWorker", actor_id=b"\x01" * 16, pid=10794, error_message=(
        f"The actor is dead because its worker process has died. Worker exit type: {exit_type} Worker exit detail: "
        f"{detail} Some common causes include: (1) the process was killed by the OOM killer"))
    return WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError(context))


def _group_error(failures: dict) -> WorkerGroupError:
    return WorkerGroupError("\n".join(f"[Rank {r} Error Snippet]:\n{e}" for r, e in failures.items()), failures)


def test_the_dead_rank_comes_first_and_the_collateral_error_after_it():
    error = _group_error({0: RuntimeError(GLOO_CLOSED),
                          1: _dead_worker("SYSTEM_ERROR", "Worker unexpectedly exits with a connection error code 2. "
                                                          "End of file.")})
    assert describe_failure(error) == (
        "rank 1's process died (SYSTEM_ERROR: Worker unexpectedly exits with a connection error code 2.); "
        "rank 0 then raised RuntimeError: Connection closed by peer [127.0.0.1]:4994")


def test_an_out_of_memory_kill_says_so():
    error = _group_error({0: _dead_worker("NODE_OUT_OF_MEMORY", "Task was killed due to the node running low on "
                                                                "memory."),
                          1: _dead_worker("NODE_OUT_OF_MEMORY", "Task was killed due to the node running low on "
                                                                "memory.")})
    assert describe_failure(error) == ("ranks 0, 1's process died (NODE_OUT_OF_MEMORY: Task was killed due to the "
                                       "node running low on memory.)")


def test_the_same_error_on_every_rank_is_said_once_and_long_ones_are_cut():
    import torch

    error = _group_error({0: ValueError("labels: 3 is out of range"), 1: ValueError("labels: 3 is out of range"),
                          2: torch.distributed.DistNetworkError("Broken pipe " + "x" * 300)})
    line = describe_failure(error)
    assert line.startswith("ranks 0, 1 raised ValueError: labels: 3 is out of range; "
                           "rank 2 raised torch.distributed.DistNetworkError: Broken pipe xxx")
    assert len(line.split("; ")[1]) == len("rank 2 raised ") + 200 and line.endswith("…")


def test_a_controller_error_gives_its_cause(tmp_path):
    error = ControllerError(TimeoutError("The worker group startup timed out after 60.0 seconds"))
    assert describe_failure(error) == "TimeoutError: The worker group startup timed out after 60.0 seconds"
    error = _group_error({0: RuntimeError(GLOO_CLOSED)})
    written = write_failure(tmp_path, error, describe_failure(error))
    assert written == tmp_path / FAILURE_FILE
    text = written.read_text()
    assert text.startswith("rank 0 raised RuntimeError: Connection closed by peer") and "[Rank 0 Error Snippet]" in text
