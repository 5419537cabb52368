"""What runs inside Ray Tune: one trial = one stage run through the shared training loop, and the searcher.

A trial is a function trainable that applies its sampled params to the job, then runs the stage with
`run_training_stage` (a nested Ray Train run, so a trial may use several workers and DeepSpeed as the spec
says). The loop reports each epoch's evaluation; `EpochReport` forwards those reports, and only those, to
Tune, so ASHA compares trials epoch by epoch. Tokenizer and prepared data are made once by the driver and
shared: a trial that trained its own tokenizer would measure WordPiece's non-determinism, not its params.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

TRIAL_KEY = "__korch_trial"
"""Config key carrying the Optuna trial number, which names the trial's folder (`trials/trial-007/`)."""


class EpochReport(TuneReportCallback):
    """Forwards the loop's epoch-end reports (those carrying `eval_<metric>`) to Tune as `<metric>`."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        row = metrics[0]
        if f"eval_{self.metric}" not in row:
            return  # a mid-epoch checkpoint: no evaluation to compare
        result = {k.removeprefix("eval_"): v for k, v in row.items() if k.startswith("eval_")}
        result.update(epoch=row.get("epoch"), step=row.get("step"), train_loss=row.get("loss"))
        self._training_actor_item_queue.put(result)


class _OneWorkerContext:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_rank(self) -> int:
        return 0


class InTrialTrainAPI:
    """What the loop asks of `ray.train`, for a loop running in the Tune trial's own process (one worker).

    Spares each trial a nested Ray Train run (a controller and a worker process, each importing torch and
    DeepSpeed: tens of seconds per trial on 2 busy cores). Epoch-end reports go to `ray.tune.report`;
    checkpoints are not kept, since a stopped trial is never continued (a new trial is asked instead).
    """

    def __init__(self, metric: str):
        import ray.train

        self.metric = metric
        self.Checkpoint = ray.train.Checkpoint

    def get_context(self) -> _OneWorkerContext:
        return _OneWorkerContext()

    def get_checkpoint(self):
        return None

    def report(self, metrics: dict, checkpoint=None) -> None:
        from ray import tune

        if f"eval_{self.metric}" in metrics:
            result = {k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith("eval_")}
            tune.report({**result, "epoch": metrics.get("epoch"), "step": metrics.get("step"),
                         "train_loss": metrics.get("loss")})


def _launch_in_trial(metric: str):
    """The runner's `launch` hook: the loop, here, as rank 0 of a one-process gloo group."""

    def launch(loop_config: dict):
        import socket

        import torch.distributed as dist

        from korch.train import loop

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          LOCAL_WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
        loop.TRAIN_API = InTrialTrainAPI(metric)
        try:
            return loop.train_loop_per_worker(loop_config)
        finally:
            loop.TRAIN_API = None
            dist.destroy_process_group()

    return launch


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """The function trainable. `setup` (constant over trials) holds the raw job, stage name, fixed params,
    metric and the shared tokenizer / prepared data."""
    from korch.config import JobConfig
    from korch.train.runner import StageContext, run_training_stage
    from korch.tune.space import apply_params

    number = int(config[TRIAL_KEY])
    params = {k: v for k, v in config.items() if k != TRIAL_KEY}
    trial_dir = Path(setup["campaign_dir"]) / "trials" / f"trial-{number:03d}"
    trial_dir.mkdir(parents=True, exist_ok=True)
    raw = apply_params(setup["raw_job"], setup["stage"], {**setup["fixed"], **params})
    stage = JobConfig.model_validate(raw).stage(setup["stage"])
    (trial_dir / "params.json").write_text(json.dumps(params, indent=1))
    ctx = StageContext(stage_dir=trial_dir, tokenizer_dir=setup.get("tokenizer_dir"), fresh_run=True,
                       extra={"train_callbacks": [EpochReport(setup["metric"])],
                              "launch": _launch_in_trial(setup["metric"])})
    if setup.get("prepared_data") and not (trial_dir / "data").exists():
        os.symlink(setup["prepared_data"], trial_dir / "data")  # the data is fingerprinted: reused, not redone
    began = time.perf_counter()
    summary = run_training_stage(stage, ctx)
    summary["seconds"] = round(time.perf_counter() - began, 2)
    (trial_dir / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str))


class DeadlineOptunaSearch(OptunaSearch):
    """OptunaSearch (TPE over the campaign's RDB study) that starts no trial the window can't fit.

    The decision is `deadline.can_start_trial` over the durations of the study's finished trials, earlier
    sessions' included. Tune's own checkpointing of the searcher is turned off: the study is the state.
    """

    def __init__(self, *args, search_end: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.search_end = search_end
        self.refused = False

    def suggest(self, trial_id: str):
        from korch.tune.deadline import can_start_trial
        from korch.tune.study import durations

        if not can_start_trial(time.time(), self.search_end, durations(self._ot_study.get_trials(deepcopy=False))):
            self.refused = True
            return Searcher.FINISHED
        params = super().suggest(trial_id)
        if params is None or params == Searcher.FINISHED:
            return params
        ot_trial = self._ot_trials[trial_id]
        folder = f"trials/trial-{ot_trial.number:03d}"
        ot_trial.set_user_attr("folder", folder)
        ot_trial.set_user_attr("tune_trial_id", trial_id)
        return {**params, TRIAL_KEY: ot_trial.number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        # Tune hands a trial's last report only to on_trial_complete, not on_trial_result: count epochs here.
        if result and trial_id in self._ot_trials and "training_iteration" in result:
            self._ot_trials[trial_id].set_user_attr("epochs", int(result["training_iteration"]))
        super().on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str):
        pass

    def restore(self, checkpoint_path: str):
        pass


class FixedPointsSearch(Searcher):
    """Grid search through the same study machinery: hands out the given points in order (for the bench)."""

    def __init__(self, points: list[dict], study, metric: str, mode: str, skip: int = 0):
        super().__init__(metric=metric, mode=mode)
        self.points, self.study, self.trials = list(points)[skip:], study, {}
        # Each parameter's grid values, the same choices on every trial (a resumed campaign's too): Optuna
        # refuses a categorical parameter whose choices change within a study.
        self.axes: dict[str, list] = {}
        for point in points:
            for key, value in point.items():
                if value not in self.axes.setdefault(key, []):
                    self.axes[key].append(value)

    def suggest(self, trial_id: str):
        if not self.points:
            return Searcher.FINISHED
        point = self.points.pop(0)
        self.study.enqueue_trial(point)  # the next ask() gets exactly this point
        trial = self.study.ask()
        for key in point:  # record the params so the leaderboard shows them
            trial.suggest_categorical(key, self.axes[key])
        trial.set_user_attr("folder", f"trials/trial-{trial.number:03d}")
        self.trials[trial_id] = trial
        return {**point, TRIAL_KEY: trial.number}

    def on_trial_result(self, trial_id: str, result: dict):
        if self.metric in result:
            self.trials[trial_id].report(result[self.metric], result["training_iteration"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        from optuna.trial import TrialState

        value = (result or {}).get(self.metric)
        if result and "training_iteration" in result:
            self.trials[trial_id].set_user_attr("epochs", int(result["training_iteration"]))
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        self.study.tell(self.trials[trial_id], value if value is not None else None, state=state)
