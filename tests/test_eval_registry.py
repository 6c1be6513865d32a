"""The task registry: every supmae-eval subcommand is a registry entry and vice versa, each entry's declared
inputs and options match its function, and the command line dispatches through the registry."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from training import evaluate as ev
from training.eval_cli import build_parser, main

BASE = ["--workers", "0", "--device", "cpu", "--batch-size", "4", "--no-progress", "--no-save"]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_is_a_registered_task_and_every_task_a_subcommand():
    assert list(_subcommands()) == list(ev.REGISTRY) == list(ev.TASKS)
    assert set(ev.TASKS) >= {"accuracy", "knn", "linprobe", "fewshot", "robustness", "retrieval"}
    assert ev.TASK_FUNCTIONS == {name: t.function for name, t in ev.REGISTRY.items()}


@pytest.mark.parametrize("name", list(ev.REGISTRY))
def test_a_tasks_declared_inputs_and_options_match_its_function(name):
    task = ev.REGISTRY[name]
    params = inspect.signature(task.function).parameters
    assert list(params)[:2] == ["checkpoint", "data"] and {"run", "name"} <= set(params)
    for flag, declared in (("train", task.train), ("probe", task.probe), ("class_map", task.class_map)):
        assert (flag in params) == declared, flag
    run_fields = {f.name for f in dataclasses.fields(ev.RunConfig)}
    for opt in task.options:
        assert (opt.param in run_fields) if opt.run else (opt.param in params), opt.flags
        if not opt.run and "default" in opt.argparse and opt.convert is None:
            default = params[opt.param].default  # the CLI's default is the function's
            cli = opt.argparse["default"]
            cli = list(ev.CORRUPTIONS) if cli == ["all"] else cli  # --corruptions all: every one
            assert (list(default) if isinstance(default, tuple) else default) == cli, opt.flags
    # the subcommand has the shared flags plus exactly the declared ones
    flags = {s for a in _subcommands()[name]._actions for s in a.option_strings}
    assert ("--train-data" in flags) == task.train and ("--optimizer" in flags) == task.probe
    assert {f for o in task.options for f in o.flags} <= flags


def _spy(monkeypatch, name):
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return ev.EvalResult(
            task="spy", checkpoint=str(args[0]), name=kwargs["name"] or "x", summary={"n": 1}
        )

    monkeypatch.setitem(ev.REGISTRY, name, dataclasses.replace(ev.REGISTRY[name], function=fake))
    return calls


def test_the_command_line_calls_the_registered_function_with_its_options(monkeypatch, capsys):
    calls = _spy(monkeypatch, "knn")
    assert main(["knn", "--checkpoint", "a", "--checkpoint", "b", "--data", "d", "--k", "7", *BASE]) == 0
    assert [c[0][0] for c in calls] == ["a", "b"]
    (ckpt, data, train), kw = calls[0]
    assert data == ev.DataSpec("d") and train is None
    assert kw["k"] == 7 and kw["temperature"] == 0.07 and kw["run"].batch_size == 4 and kw["name"] is None
    assert "class_map" not in kw and "probe" not in kw

    calls = _spy(monkeypatch, "retrieval")
    argv = ["retrieval", "--checkpoint", "c", "--data", "d", "--holdout", "10", "--train-data", "t"]
    assert main([*argv, "--precision-at", "1", "5", "--index", "hnsw", *BASE]) == 0
    (ckpt, data, train), kw = calls[0]
    assert data.holdout == 10 and train == ev.DataSpec("t")
    assert kw["precision_at"] == [1, 5] and kw["map_at"] == 100 and kw["index_kind"] == "hnsw"

    calls = _spy(monkeypatch, "robustness")
    argv = ["robustness", "--checkpoint", "c", "--data", "d", "--variant", "r=/x", "--cache-gb", "0.5"]
    assert main([*argv, "--max-per-class", "3", *BASE]) == 0
    (ckpt, data), kw = calls[0]
    assert kw["variants"] == {"r": ev.DataSpec("/x", max_per_class=3)} and kw["run"].cache_gb == 0.5
    assert kw["class_map"] is None and "cache_gb" not in kw
    capsys.readouterr()


def test_a_new_registry_entry_becomes_a_subcommand(monkeypatch, capsys):
    def evaluate_echo(checkpoint, data, *, word="hi", run=None, name=None):
        return ev.EvalResult("echo", str(checkpoint), name or "x", {"word": word})

    opt = ev.Option(("--word",), "word", {"default": "hi"})
    monkeypatch.setitem(ev.REGISTRY, "echo", ev.Task("echo", evaluate_echo, "say a word", options=(opt,)))
    assert main(["echo", "--checkpoint", "c", "--data", "d", "--word", "hello", *BASE]) == 0
    assert "hello" in capsys.readouterr().out
