"""Driver for tests/train/test_resume_tensors.py (run as a script, so its Ray stays out of the test process).

Real DeepSpeed engines in real Ray Train TorchTrainer runs of 2, 1, 2 and 6 CPU workers drive korch's own
checkpoint code (`gather_full_state`, `write_checkpoint`, `read_checkpoint`, `load_weights_into`,
`restore_optimizer_state`) for ZeRO 0-3 on a tiny BERT whose parameter sizes are not multiples of 2 or 6
(so ZeRO-3's padded partitions are exercised):

    A  2 workers: 2 steps (batches G1, G2) -> checkpoint A, then one step on G3 -> reference A3
    B  1 worker : restore A, gather again, then one step on G3 (compare with A3) -> checkpoint B, step G4 -> B4
    C  2 workers: restore B (1 -> 2), gather, step G4 (compare with B4)
    D  6 workers: restore A (2 -> 6), gather, step G3 (compare with A3)

Every global batch has 6 samples, split evenly across 1, 2 or 6 workers; every token is a label and dropout
is off, so one optimizer step is the same maths whatever the worker count. Rank 0 writes what it found to
OUT/<run>.json: the largest difference per gathered tensor against the checkpoint, the Adam steps, and the
largest difference after the shared next step against the reference. Last, each engine takes a set of full
weights through `korch.train.swa.load_full_weights` (how SWA's average goes into a live engine) and its
forward is compared with a plain model holding the same weights.

    python tests/train/zero_resume_driver.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = (0, 1, 2, 3)
GLOBAL_BATCH = 6
SEQ = 5
VOCAB = 37


def _tiny_bert():
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    # Odd sizes: 37 x 10 embeddings, 14-wide FFN... nothing divides evenly by 2 or 6.
    config = BertConfig(vocab_size=VOCAB, hidden_size=10, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=14, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(config)


def _batch(index: int, rank: int, world: int):
    import torch

    generator = torch.Generator().manual_seed(1000 + index)
    ids = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=generator)
    per = GLOBAL_BATCH // world
    mine = ids[rank * per:(rank + 1) * per]
    return mine, mine.clone()  # every token is a label: equal label counts per rank, so means compose exactly


def _max_diff(a: dict, b: dict) -> dict:
    if set(a) != set(b):
        return {"__keys__": f"missing {sorted(set(b) - set(a))[:3]}, extra {sorted(set(a) - set(b))[:3]}"}
    return {k: float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a}


def worker(config: dict) -> None:
    import ray.train
    import torch
    from safetensors.torch import load_file, save_file

    from korch.config import DeepSpeedConfig, TrainConfig
    from korch.train import checkpoint as ckpt
    from korch.train.deepspeed_config import build_deepspeed_config
    from korch.train.loop import import_deepspeed, skip_shm_comm_build

    deepspeed = import_deepspeed()  # as korch's loop does
    skip_shm_comm_build()  # as korch's loop does on CPU
    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    out = Path(config["out"])
    report: dict = {"world": world}
    for stage in config.get("stages", STAGES):
        found: dict = {}
        model = _tiny_bert()
        restore = config.get("restore")
        if restore:
            weights, moments, state = ckpt.read_checkpoint(out / restore / f"zero{stage}")
            ckpt.load_weights_into(model, weights)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        train = TrainConfig(micro_batch_size=GLOBAL_BATCH // world, max_steps=10)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=build_deepspeed_config(DeepSpeedConfig(zero_stage=stage), train, world, use_gpu=False))
        engine.train()

        def step(index: int) -> None:
            inputs, labels = _batch(index, rank, world)
            loss = engine(input_ids=inputs, labels=labels).loss
            engine.backward(loss)
            engine.step()

        if restore:
            ckpt.restore_optimizer_state(engine.module, optimizer, moments, int(state["adam_step"]))
            got_w, got_m, got_step = ckpt.gather_full_state(engine.module, optimizer)
            found.update(weights=_max_diff(got_w, weights), moments=_max_diff(got_m, moments),
                         moment_keys=len(moments), adam_step=got_step, state=state)
        done = int(state["position"]) - 1 if restore else 0
        for action, arg in config["actions"]:
            if action == "step":
                step(arg)
                done = arg
                continue
            # Collective: every rank gathers, rank 0 writes or compares.
            got_w, got_m, got_step = ckpt.gather_full_state(engine.module, optimizer)
            if rank != 0:
                continue
            reference = out / f"after_{done}_zero{stage}.safetensors"
            if action == "save":
                # `position` stands in for the loop's data position: the next global batch to read.
                ckpt.write_checkpoint(out / arg / f"zero{stage}", got_w, got_m,
                                      {"step": got_step, "adam_step": got_step, "position": done + 1, "world_size": world})
            elif action == "reference":
                save_file({k: v.contiguous() for k, v in got_w.items()}, str(reference))
            elif action == "compare":
                found[f"after_{done}"] = _max_diff(got_w, load_file(str(reference)))
        found["swa_forward"] = _swa_forward_diff(engine, optimizer, rank, world)
        report[f"zero{stage}"] = found
        del engine, optimizer, model
    if rank == 0:
        (out / f"{config['name']}.json").write_text(json.dumps(report))


def _swa_forward_diff(engine, optimizer, rank: int, world: int) -> float:
    """Collective. Largest logit difference between the engine after `load_full_weights` and a plain model."""
    import torch

    from korch.train import checkpoint as ckpt
    from korch.train.swa import load_full_weights

    current, _, _ = ckpt.gather_full_state(engine.module, optimizer)
    target = {name: value * 0.5 + 0.01 for name, value in current.items()}  # any weights unlike the live ones
    load_full_weights(engine.module, target)
    inputs, _ = _batch(99, rank, world)
    engine.eval()
    with torch.no_grad():
        got = engine(input_ids=inputs).logits
        plain = _tiny_bert()
        ckpt.load_weights_into(plain, target)
        expected = plain.eval()(input_ids=inputs).logits
    return float((got - expected).abs().max())


def main(out: str) -> None:
    import os

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from korch.train.job import init_local_ray

    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    init_local_ray(4)
    runs = [
        dict(name="A", workers=2, actions=[("step", 1), ("step", 2), ("save", "ckptA"), ("step", 3), ("reference", 0)]),
        dict(name="B", workers=1, restore="ckptA",
             actions=[("step", 3), ("compare", 0), ("save", "ckptB"), ("step", 4), ("reference", 0)]),
        dict(name="C", workers=2, restore="ckptB", actions=[("step", 4), ("compare", 0)]),
        # Six workers on 2 cores cost the most: ZeRO-1 (optimizer partitions) and ZeRO-3 (parameter partitions)
        # are the two resharding paths; 0 replicates and 2 partitions like 1.
        dict(name="D", workers=6, restore="ckptA", actions=[("step", 3), ("compare", 0)], stages=[1, 3]),
    ]
    only = os.environ.get("ZERO_RESUME_RUNS")
    try:
        for run in runs:
            if only and run["name"] not in only.split(","):
                continue
            trainer = TorchTrainer(
                worker, train_loop_config={**run, "out": str(out_dir)}, torch_config=TorchConfig(backend="gloo"),
                scaling_config=ScalingConfig(num_workers=run["workers"], resources_per_worker={"CPU": 0.25}),
                run_config=RunConfig(name=f"zero-resume-{run['name']}", storage_path=str(out_dir / "ray")))
            trainer.fit()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
