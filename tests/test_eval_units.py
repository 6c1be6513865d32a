"""One unit for accuracy: the trainer's in-loop hold-out evaluation and `supmae-eval accuracy` give the same
percentages on the same checkpoint and images (the top-k code is shared: training.evaluate.metrics)."""

from __future__ import annotations

import json

import pytest

from tests.builders import small
from tests.test_eval import write_colour_folder
from training import evaluate as ev
from training.engine import FINAL, train
from training.observe import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread on a shared CPU


@pytest.mark.parametrize("in_memory", ["true", "false"])  # decoded tensors, and a streamed ImageFolder
def test_trainer_and_evaluator_agree_on_the_same_checkpoint_and_images(tmp_path, in_memory):
    data = write_colour_folder(tmp_path / "data", per_class=10)
    cfg = small(
        data=str(data),
        dataset="folder",
        in_memory=in_memory,
        holdout=18,
        holdout_seed=3,
        batch_size=14,
        eval_batch_size=8,
        num_workers=0,
        save_dtype="float32",
    )
    train(cfg, tmp_path / "run", command="test")
    final = tmp_path / "run" / FINAL
    card = json.loads((final / "model.json").read_text())["metrics"]
    in_loop = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"][-1]

    run = ev.RunConfig(device="cpu", batch_size=8, workers=0)
    r = ev.evaluate_accuracy(final, ev.DataSpec(data, holdout="card"), run=run)
    assert r.details["images"] == card["holdout_images"] == in_loop["images"] == 18
    # the same percentages: in the run's log exactly, in the card to its 5 decimals
    assert in_loop["top1"] == r.details["top1"] and in_loop["top5"] == r.details["top5"]
    assert card["holdout_top1"] == round(r.details["top1"], 5) and card["holdout_top5"] == round(
        r.details["top5"], 5
    )
