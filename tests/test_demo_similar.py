"""The demo's "Similar images" tab (app/similar.py) without a browser: the tab appears with an index, its
search returns thumbnails with labels and scores, files outside the index's image folder are never read, and
the mounted page's guard (app/guard.py) covers the new input. tests/test_browser_demo.py drives it in Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supmae_serve.backends import BackendConfig, create_backend
from supmae_serve.features.featureset import Features, FeatureSet, write_feature_set
from supmae_serve.features.gallery import SourceRefused
from supmae_serve.features.index import FeatureIndex, IndexConfig, build_index

from .conftest import encode, synthetic_image
from .test_search import world  # noqa: F401 - the tiny model, its image folder and index

gr = pytest.importorskip("gradio", reason="the demo needs the 'demo' extra: pip install 'supmae[demo]'")
pytest.importorskip("faiss", reason="the index needs faiss: pip install 'supmae[features]'")

from app.demo import build_demo, create_demo_app  # noqa: E402


@pytest.fixture(scope="module")
def backend(world):  # noqa: F811
    b = create_backend(BackendConfig(model=world["ckpt"], backend="torch", device="cpu"))
    b.warmup()
    return b


@pytest.fixture(scope="module")
def index(world):  # noqa: F811
    return FeatureIndex.load(world["index"])


def _ids(demo) -> set:
    return {getattr(c, "elem_id", None) for c in demo.blocks.values()}


def test_the_tab_appears_with_an_index_and_finds_the_query_itself_first(backend, index, world):  # noqa: F811
    assert "similar-gallery" not in _ids(build_demo(backend))  # no index: no tab
    demo = build_demo(backend, index=index)
    assert {"similar-image", "similar-gallery", "similar-k", "similar-table"} <= _ids(demo)
    assert "similar" in {d.api_name for d in demo.fns.values()}
    query = world["images"] / "cat" / "3.png"
    gallery, table = demo.similar.search(str(query), 4)
    assert len(gallery) == 4
    thumb, caption = gallery[0]
    assert caption.startswith("cat · 1.000") and thumb.size == (
        96,
        96,
    )  # the model's 32-px input upscaled x3, nearest
    assert "| 1 | cat | 1.0000 | cat/3.png |" in table
    assert demo.similar.search(None, 4) == ([], "")  # the query was cleared
    for bad in (0, 25, 2.5, "x"):
        with pytest.raises(gr.Error, match="whole number from 1 to 24"):
            demo.similar.search(str(query), bad)
    with pytest.raises(gr.Error):
        demo.similar.search(str(world["root"] / "missing.png"), 4)


def test_a_neighbour_outside_the_image_folder_is_never_read(backend, world, tmp_path, monkeypatch):  # noqa: F811
    """An index whose metadata names a file outside its recorded image folder (a crafted or moved index):
    the neighbour is listed in the table, its file is not opened."""
    fs = FeatureSet.open(world["root"] / "gallery" / "features")
    f = fs.read()
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(synthetic_image((40, 40), seed=99)))
    sources = [str(secret)] + f.sources[1:]
    crafted = Features(f.ids, f.labels, sources, f.embeddings)
    write_feature_set(tmp_path / "feats", crafted, fs.identity, extra={"input": fs.manifest["input"]})
    build_index([tmp_path / "feats"], tmp_path / "index", IndexConfig())
    idx = FeatureIndex.load(tmp_path / "index")
    demo = build_demo(backend, index=idx)
    with pytest.raises(SourceRefused, match="outside"):
        demo.similar.preview(str(secret))
    opened = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self.resolve()) or real(self))
    gallery, table = demo.similar.search(str(world["images"] / f.ids[0]), 8)
    monkeypatch.undo()
    assert secret not in opened and len(gallery) == 7
    assert f"| {f.ids[0]} |" in table and "1 neighbour(s) not shown" in table


def test_an_index_without_local_files_shows_a_table_only(backend, world, tmp_path):  # noqa: F811
    fs = FeatureSet.open(world["root"] / "gallery" / "features")
    f = fs.read()
    shards = Features(f.ids, f.labels, [f"/data/shard-0.tar#{i}" for i in f.ids], f.embeddings)
    write_feature_set(
        tmp_path / "feats", shards, fs.identity, extra={"input": {"kind": "wds", "root": "/data"}}
    )
    build_index([tmp_path / "feats"], tmp_path / "index", IndexConfig())
    demo = build_demo(backend, index=FeatureIndex.load(tmp_path / "index"))
    assert not demo.similar.thumbnails and "no thumbnails" in demo.similar.describe()
    gallery, table = demo.similar.search(str(world["images"] / "dog" / "0.png"), 3)
    assert gallery == [] and table.count("\n| ") == 4 and "not shown" not in table


def _call(client, api_name: str, data: list) -> tuple[int, str, str]:
    r = client.post(f"/demo/gradio_api/call/{api_name}", json={"data": data})
    if r.status_code != 200:
        return r.status_code, "", r.text
    lines = client.get(f"/demo/gradio_api/call/{api_name}/{r.json()['event_id']}").text.strip().splitlines()
    return 200, lines[-2].removeprefix("event: "), lines[-1].removeprefix("data: ")


def test_the_mounted_tab_searches_uploads_and_refuses_files_it_was_not_sent(backend, index, world):  # noqa: F811
    from fastapi.testclient import TestClient

    with TestClient(create_demo_app(backend, index=index)) as client:
        query = world["images"] / "dog" / "1.png"
        with open(query, "rb") as fh:
            (uploaded,) = client.post(
                "/demo/gradio_api/upload", files={"files": ("q.png", fh, "image/png")}
            ).json()
        file = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
        status, event, data = _call(client, "similar", [file, 3])
        assert (status, event) == (200, "complete"), data
        gallery, table = json.loads(data)
        assert len(gallery) == 3 and gallery[0]["caption"].startswith("dog · 1.000")
        assert "dog/1.png" in table
        # a file on the server's disk that was not uploaded: refused at the HTTP boundary (app/guard.py)
        for path in (str(query), "/etc/passwd"):
            status, _, text = _call(
                client, "similar", [{"path": path, "meta": {"_type": "gradio.FileData"}}, 3]
            )
            assert status == 403 and "only reads files uploaded to it" in text, (path, text)


def test_thumbnails_are_decoded_within_the_demos_limits(backend, index, world, tmp_path):  # noqa: F811
    from app.demo import DemoConfig
    from supmae_serve.preprocess import ImageError, ImageLimits

    demo = build_demo(backend, index=index, config=DemoConfig(limits=ImageLimits(max_bytes=100)))
    with pytest.raises(ImageError, match="over the limit of 100"):
        demo.similar.preview("../images/cat/0.png")
