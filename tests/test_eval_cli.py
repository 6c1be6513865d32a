"""supmae-eval command line: tables, side-by-side mode, JSON next to the checkpoint, --update-card,
and clear errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from supmae_serve.model import load_checkpoint, save_checkpoint
from tests.conftest import TINY, tiny_model
from tests.test_eval import CLASSES, write_colour_folder
from training.eval_cli import build_parser, main

BASE = ["--workers", "0", "--device", "cpu", "--batch-size", "16", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread on a shared CPU


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_colour_folder(root / "data", per_class=6)
    a, b, mae = root / "supmae", root / "supervised", root / "mae"
    save_checkpoint(tiny_model(num_classes=6, seed=1), a, variant=TINY, class_names=CLASSES)
    save_checkpoint(tiny_model("supervised", num_classes=6, seed=2), b, variant=TINY, class_names=CLASSES)
    save_checkpoint(tiny_model("mae", num_classes=0), mae, variant=TINY)
    return data, a, b, mae


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("|")]


def test_accuracy_side_by_side_writes_json_and_updates_cards(setup, capsys, tmp_path):
    data, a, b, _ = setup
    out = tmp_path / "all.json"
    argv = [
        "accuracy",
        "--checkpoint",
        str(a),
        "--checkpoint",
        str(b),
        "--name",
        "SupMAE",
        "--name",
        "supervised",
        "--data",
        str(data),
        "--holdout",
        "12",
        "--update-card",
        "--output",
        str(out),
        *BASE,
    ]
    assert main(argv) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0][:4] == ["checkpoint", "images", "classes", "top-1"]
    assert [r[0] for r in rows[2:]] == ["SupMAE", "supervised"] and all(r[1] == "12" for r in rows[2:])
    combined = json.loads(out.read_text())["results"]
    for ckpt, result in zip((a, b), combined, strict=True):
        saved = json.loads((ckpt / "eval" / "accuracy-data-holdout12-seed0.json").read_text())
        assert saved["details"]["top1"] == result["details"]["top1"]
        _, card = load_checkpoint(ckpt)
        assert card.metrics["eval"]["accuracy/data-holdout12-seed0"]["top-1"] == result["summary"]["top-1"]


def test_feature_tasks_and_robustness_run(setup, capsys):
    data, a, b, mae = setup
    common = ["--data", str(data), "--holdout", "12", "--no-save", *BASE]
    assert main(["knn", "--checkpoint", str(mae), "--k", "5", *common]) == 0
    assert table_rows(capsys.readouterr().out)[0] == ["checkpoint", "train", "test", "k", "top-1", "top-5"]
    assert main(["linprobe", "--checkpoint", str(mae), "--weight-decay", "0.01", *common]) == 0
    assert "test top-1" in capsys.readouterr().out
    assert main(["fewshot", "--checkpoint", str(mae), "--shots", "1", "2", "--seeds", "0", "1", *common]) == 0
    assert table_rows(capsys.readouterr().out)[0] == ["checkpoint", "test", "seeds", "1-shot", "2-shot"]
    argv = [
        "robustness",
        "--checkpoint",
        str(a),
        "--corruptions",
        "contrast",
        "pixelate",
        "--severities",
        "1",
        "3",
        "--variant",
        f"again={data}",
        *common,
    ]
    assert main(argv) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0] == [
        "checkpoint",
        "clean error",
        "contrast",
        "pixelate",
        "mean corruption error",
        "again top-1",
        "combined",
    ]
    assert ["corruption", "s1", "s3", "mean"] in rows
    # side by side against one baseline: the baseline itself scores an mCE of 100
    argv = [
        "robustness",
        "--checkpoint",
        str(a),
        "--checkpoint",
        str(b),
        "--name",
        "A",
        "--name",
        "B",
        "--baseline",
        str(b),
        "--corruptions",
        "impulse_noise",
        "--severities",
        "5",
        *common,
    ]
    assert main(argv) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0][3] == "mCE" and rows[3][0] == "B" and rows[3][3] == "100.00"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["accuracy", "--checkpoint", "{mae}"], "classification head"),
        (["knn", "--checkpoint", "{mae}"], "--holdout 5000 --seed 0"),
        (["accuracy", "--checkpoint", "{a}", "--holdout", "lots"], "hold-out must be"),
        (["accuracy", "--checkpoint", "{a}", "--name", "x", "--name", "y"], "2 --name for 1 --checkpoint"),
        (["robustness", "--checkpoint", "{a}", "--variant", "nopath"], "NAME=PATH"),
        (["robustness", "--checkpoint", "{a}", "--corruptions", "fog"], "available: gaussian_noise"),
        (["accuracy", "--checkpoint", "{a}", "--class-map", "{missing}"], "--class-map"),
        (["accuracy", "--checkpoint", "{missing}"], "checkpoint not found"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(setup, capsys, tmp_path, argv, message):
    data, a, _, mae = setup
    argv = [x.format(a=a, mae=mae, missing=tmp_path / "nope") for x in argv]
    assert main([*argv, "--data", str(data), "--no-save", *BASE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supmae-eval: error:") and message in err


def test_every_task_has_a_subcommand():
    from training.evaluate import TASKS

    parser = build_parser()
    for task in TASKS:
        args = parser.parse_args([task, "--checkpoint", "c", "--data", "d"])
        assert args.task == task


@pytest.mark.parametrize("task", ["accuracy", "robustness"])
def test_a_corrupt_image_read_by_a_worker_process_is_one_clear_line(setup, capsys, tmp_path, task):
    """With decoding workers (the default), the error raised in a worker reaches the user as the
    one-line message naming the file, not as the DataLoader's re-raised worker traceback."""
    _, a, _, _ = setup
    data = write_colour_folder(tmp_path / "bad", per_class=2)
    (data / CLASSES[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    argv = [task, "--checkpoint", str(a), "--data", str(data), "--no-save", *BASE, "--workers", "1"]
    if task == "robustness":
        argv += ["--corruptions", "contrast", "--severities", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("supmae-eval: error: ") and err.count("\n") == 1, err
    assert "broken.png" in err and "Traceback" not in err and "DataLoader worker" not in err
