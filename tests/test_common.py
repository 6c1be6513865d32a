"""supmae_serve.common: image listing, atomic writes, WebDataset shard reading (shared by the trainer and
the bulk job)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import tarfile
from pathlib import Path

import pytest

from supmae_serve.common import files, shards
from supmae_serve.common.args import config_from_args
from training import data as D

from .conftest import encode, synthetic_image


def test_training_data_names_are_the_common_ones():
    assert D.scan_image_folder is files.scan_image_folder
    assert D.DataError is files.DataError
    assert D.IMAGE_EXTENSIONS == files.IMAGE_EXTENSIONS


def test_list_image_files_is_sorted_recursive_and_skips_hidden(tmp_path):
    for rel in ("b.png", "a/c.JPG", "a/.hidden.png", ".cache/x.png", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in files.list_image_files(tmp_path)] == [
        "a/c.JPG",
        "b.png",
    ]


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    files.atomic_write_text(target, "old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, fail)
    assert target.read_text() == "old"
    assert list(tmp_path.glob(".*.tmp")) == []  # the temp file is removed too


def test_stale_temp_files_are_found_and_removed(tmp_path):
    (tmp_path / ".part-000001.parquet.abc.tmp").write_bytes(b"half a shard")
    (tmp_path / "part-000000.parquet").write_bytes(b"done")
    assert [p.name for p in files.remove_stale_temp_files(tmp_path)] == [".part-000001.parquet.abc.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["part-000000.parquet"]


def test_expand_braces():
    assert shards.expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert shards.expand_braces("{a,b}/x-{8..10}.tar") == [
        "a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar", "b/x-9.tar", "b/x-10.tar",
    ]  # fmt: skip
    assert shards.expand_braces("plain.tar") == ["plain.tar"]


def test_shard_detection_and_image_field():
    assert shards.looks_like_shards("/d/shards-{000..009}.tar")
    assert shards.looks_like_shards("https://host/x.tar")
    assert not shards.looks_like_shards("/data/imagenet/train")
    assert shards.image_field({"cls": b"1", "png": b"", "jpg": b""}) == "jpg"
    assert shards.image_field({"cls": b"1"}) is None
    assert shards.split_key("dir/000123.seg.png") == ("dir/000123", "seg.png")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_scan_tar_groups_fields_and_reads_members_by_offset(tmp_path):
    png, jpg = encode(synthetic_image(seed=1)), encode(synthetic_image(seed=2), "JPEG")
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "train/a.png", png)
        _add(tar, "train/a.cls", b"3\n")
        _add(tar, "train/b.jpg", jpg)
        _add(tar, "train/c.json", b"{}")
    samples = shards.scan_tar(path)
    assert [s.key for s in samples] == ["train/a", "train/b", "train/c"]
    assert samples[0].label == "3" and samples[1].label is None
    assert shards.read_member(path, samples[0].fields["png"]) == png
    got = {s.key: f for s, f in shards.iter_samples(path)}
    assert got["train/b"]["jpg"] == jpg and got["train/c"] == {"json": b"{}"}


def test_webdataset_package_reads_what_scan_tar_reads(tmp_path):
    wds = pytest.importorskip("webdataset")
    path = tmp_path / "shard-000.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "png": encode(synthetic_image(seed=i)), "cls": str(i)})
    ours = [(s.key, f["png"]) for s, f in shards.iter_samples(path)]
    theirs = [(s["__key__"], s["png"]) for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert ours == theirs


# ---------------------------------------------------------------------------- system, optional, progress, versions
def test_cpu_name_and_flags_are_read_once_from_the_machine():
    from supmae_serve.common.system import cpu_flags, cpu_name

    assert cpu_name() and cpu_name() != "unknown"
    if Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
        assert cpu_name() in text
        line = next(x for x in text.splitlines() if x.startswith(("flags", "Features")))
        assert cpu_flags() == frozenset(line.split(":", 1)[1].split())


def test_resolve_device_raises_the_callers_error_with_what_is_allowed():
    import torch

    from supmae_serve.common.system import resolve_device

    class MyError(ValueError):
        pass

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(MyError, match="use auto, cpu, cuda"):
        resolve_device("tpu-ish", MyError)
    if not torch.cuda.is_available():
        with pytest.raises(MyError, match="CUDA is not available"):
            resolve_device("cuda:0", MyError)


def test_require_names_the_purpose_and_the_extra_that_installs_it():
    from supmae_serve.common.optional import MissingDependency, install_hint, require

    assert require("json", "anything").dumps([1]) == "[1]"
    assert install_hint("faiss") == "pip install 'supmae[features]' (faiss-cpu)"
    assert install_hint("gradio.routes") == "pip install 'supmae[demo]'"
    with pytest.raises(
        MissingDependency, match=r"the thing needs no_such_pkg_xyz: pip install no_such_pkg_xyz"
    ):
        require("no_such_pkg_xyz.sub", "the thing")


def test_track_yields_every_item_and_logs_the_rate_when_not_a_terminal(capsys):
    from supmae_serve.common.progress import Progress, track

    assert list(track(iter(range(5)), total=5, desc="decode")) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "decode: batch 5/5 |" in err and "batch/s" in err  # the last step always prints
    assert list(track(range(3), total=3, desc="quiet", enabled=False)) == [0, 1, 2]
    p = Progress("log", 10, unit="step")
    p.update(10, {"loss": 0.5})
    assert "step 10/10 | loss 0.5000 |" in capsys.readouterr().err


def test_software_versions_name_this_package_python_and_torch():
    import platform

    import torch

    from supmae_serve import __version__
    from supmae_serve.common.versions import software_versions

    v = software_versions(["no_such_pkg_xyz"], system=True)
    assert v["supmae"] == __version__ and v["python"] == platform.python_version()
    assert v["torch"] == torch.__version__  # an imported module keeps its build tag
    assert "no_such_pkg_xyz" not in v and v["cpu"]


def test_config_from_args_takes_flags_named_like_fields_and_explicit_values():
    @dataclasses.dataclass
    class Cfg:
        batch_size: int = 8
        device: str = "auto"
        seed: int = 0  # no flag: keeps its default
        command: str = ""

    ns = argparse.Namespace(batch_size=32, device="cpu", command="run", unrelated=1)
    assert config_from_args(Cfg, ns, command="supmae-embed run") == Cfg(32, "cpu", 0, "supmae-embed run")
    assert config_from_args(Cfg, argparse.Namespace()) == Cfg()
    with pytest.raises(TypeError, match="no field 'batch'"):
        config_from_args(Cfg, ns, batch=1)
