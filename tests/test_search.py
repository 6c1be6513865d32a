"""POST /v1/search and --index: image and vector queries, the top_k limit, no index, bad vectors, API keys,
metrics and /v1/info; the refusal of another model's index; the shipped gallery loaded for the bundled model;
and the rule that only files inside an index's recorded image folder are ever shown."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from supmae_serve.api.app import create_app
from supmae_serve.api.search import SearchIndexError
from supmae_serve.backends import BackendConfig, create_backend
from supmae_serve.features.featureset import Features, write_feature_set
from supmae_serve.features.gallery import (
    GALLERY_DIR,
    GALLERY_INDEX,
    SourceFiles,
    SourceRefused,
    resolve_index_spec,
)
from supmae_serve.features.identity import model_identity
from supmae_serve.features.index import FeatureIndex, IndexConfig, build_index
from supmae_serve.preprocess import ImageLimits, decode_image, resize_side, to_tensor
from supmae_serve.settings import DEFAULT_MODEL

from .conftest import encode, synthetic_image
from .test_api import settings, tiny_checkpoint

pytest.importorskip("faiss", reason="the index needs faiss: pip install 'supmae[features]'")
pytest.importorskip("pyarrow", reason="feature sets need pyarrow: pip install 'supmae[features]'")

CLASSES = ("cat", "dog")
PER_CLASS = 4


def embed_folder(folder: Path, ckpt: Path, out: Path) -> Path:
    """A feature set of `folder` (ImageFolder) made with the server's own decoding and backend."""
    backend = create_backend(BackendConfig(model=ckpt, backend="torch", device="cpu"))
    prep = backend.card.preprocessing
    files = sorted(folder.glob("*/*.png"))
    x = [to_tensor(decode_image(f.read_bytes(), ImageLimits(), resize_side(prep)), prep) for f in files]
    import torch

    emb = backend.embed(torch.stack(x), "avg").embedding
    feats = Features(
        ids=[f.relative_to(folder).as_posix() for f in files],
        labels=[f.parent.name for f in files],
        sources=[str(f) for f in files],
        embeddings=np.asarray(emb),
    )
    ident = model_identity(backend.card, ckpt, pooling="avg", normalized=True)
    write_feature_set(out, feats, ident, extra={"input": {"kind": "folder", "root": str(folder)}})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint, an ImageFolder of 8 synthetic images, its feature set and an index (relative sources)."""
    root = tmp_path_factory.mktemp("search")
    ckpt = tiny_checkpoint(root / "ckpt")
    images = root / "gallery" / "images"
    for c, cls in enumerate(CLASSES):
        (images / cls).mkdir(parents=True)
        for i in range(PER_CLASS):
            synthetic_image((40, 40), seed=10 * c + i).save(images / cls / f"{i}.png")
    feats = embed_folder(images, ckpt, root / "gallery" / "features")
    build_index([feats], root / "gallery" / "index", IndexConfig(relative_sources=True))
    return {"ckpt": ckpt, "images": images, "index": root / "gallery" / "index", "root": root}


def app_for(world, **kw):
    base = dict(backend="torch", index=str(world["index"]), max_top_k=5)
    return create_app(settings(world["ckpt"], **{**base, **kw}))


@pytest.fixture(scope="module")
def client(world):
    with TestClient(app_for(world)) as c:
        yield c


def neighbours(r) -> list[list[str]]:
    return [[n["id"] for n in item["neighbors"]] for item in r.json()["data"]]


# ---------------------------------------------------------------------------- queries
def test_an_indexed_image_finds_itself_first_in_every_input_form(client, world):
    png = (world["images"] / "dog" / "2.png").read_bytes()
    for path in ("/v1/search", "/search"):
        r = client.post(f"{path}?top_k=3", content=png, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"] == "image" and body["top_k"] == 3 and body["index"]["count"] == 8
        (found,) = body["data"]
        first = found["neighbors"][0]
        assert (
            first["id"] == "dog/2.png"
            and first["label"] == "dog"
            and first["score"] == pytest.approx(1, abs=1e-4)
        )
        assert first["source"] == "../images/dog/2.png"  # stored relative to the index folder
        scores = [n["score"] for n in found["neighbors"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3
        assert float(r.headers["x-search-time-ms"]) >= 0
    b64 = base64.b64encode(png).decode()
    r = client.post("/v1/search", json={"images": [b64, "bm90IGFuIGltYWdl"], "top_k": 2})
    assert r.status_code == 200
    ok, bad = r.json()["data"]
    assert ok["neighbors"][0]["id"] == "dog/2.png"
    assert bad["index"] == 1 and bad["error"]["code"] == "unsupported_format"
    assert r.json()["usage"] == {"queries": 2, "succeeded": 1, "failed": 1}
    r = client.post("/v1/search", files=[("files", ("q.png", png, "image/png"))], data={"top_k": "1"})
    assert neighbours(r) == [["dog/2.png"]]
    r = client.post("/v1/search", json={"images": ["bm90IGFuIGltYWdl"]})  # every image bad: its status
    assert r.status_code == 415 and r.json()["data"][0]["error"]["code"] == "unsupported_format"


def test_vector_queries_match_an_exact_search(client, world):
    index = FeatureIndex.load(world["index"])
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, index.dim)).astype(np.float32)
    r = client.post("/v1/search", json={"vectors": q.tolist(), "top_k": 4})
    assert r.status_code == 200 and r.json()["query"] == "vector"
    expected = [[n.id for n in row] for row in index.search(q, 4)]
    assert neighbours(r) == expected
    x = index.index.reconstruct_n(0, len(index))  # the normalised indexed vectors
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    best = np.argsort(-(qn @ x.T), axis=1)[:, :4]
    assert expected == [[index.ids[j] for j in row] for row in best]
    scaled = client.post("/v1/search", json={"vectors": (q * 1000).tolist(), "top_k": 4})  # any scale
    assert neighbours(scaled) == expected


def test_top_k_has_a_limit_that_the_error_names(client):
    v = [[1.0] * 64]
    r = client.post("/v1/search", json={"vectors": v, "top_k": 6})
    assert r.status_code == 422 and "limit on this server is 5 (--max-top-k)" in r.json()["error"]["message"]
    for bad in (0, -1, "many"):
        r = client.post("/v1/search", json={"vectors": v, "top_k": bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option", bad
    r = client.post("/v1/search", json={"vectors": v, "k": 3})
    assert r.status_code == 422 and "k" in r.json()["error"]["message"]  # unknown options are refused
    assert (
        len(neighbours(client.post("/v1/search", json={"vectors": v}))[0]) == 5
    )  # default: 10, or the limit (5)


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"vectors": [[0.5] * 63]}, "vectors[0] has 63 values; this index holds 64-dimensional"),
        ({"vectors": [[0.5] * 64, [0.5] * 65]}, "vectors[1] has 65 values"),
        ({"vectors": [[0.0] * 64]}, "vectors[0] is all zeros"),
        ({"vectors": [["a"] * 64]}, "vectors[0] is not a list of numbers"),
        ({"vectors": [0.5] * 64}, "wrap a single vector in brackets"),
        ({"vectors": []}, "a list of vectors, each a list of 64 finite numbers"),
        ({"vectors": [[1e39] * 64]}, "beyond float32"),
        ({"vectors": [[10**400] + [0] * 63]}, "beyond float32"),
        ({"vectors": [[1.0] * 64], "images": ["x"]}, "not both"),
    ],
)
def test_bad_vectors_get_a_422_that_says_what_is_expected(client, body, expected):
    r = client.post("/v1/search", json=body)
    assert r.status_code == 422 and expected in r.json()["error"]["message"], r.text


def test_non_finite_values_are_refused(client):
    for token in ("NaN", "Infinity", "-Infinity"):
        raw = '{"vectors": [[' + ",".join([token] + ["1"] * 63) + "]]}"
        r = client.post("/v1/search", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "every value must be finite" in r.json()["error"]["message"], token


def test_too_many_queries_and_no_query(client):
    r = client.post("/v1/search", json={"vectors": [[1.0] * 64] * 9})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_queries"
    r = client.post("/v1/search", json={"top_k": 3})
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_images"


def test_metrics_and_info_describe_the_search(client):
    client.post("/v1/search", json={"vectors": [[1.0] * 64]})
    text = client.get("/metrics").text
    count = next(
        line for line in text.splitlines() if line.startswith('supmae_search_seconds_count{query="vector"}')
    )
    assert float(count.split()[-1]) >= 1
    assert 'supmae_request_duration_seconds_count{route="/v1/search"}' in text
    info = client.get("/v1/info").json()["index"]
    assert info["count"] == 8 and info["dim"] == 64 and info["kind"] == "flat" and info["max_top_k"] == 5
    assert info["model"]["pooling"] == "avg" and len(info["model"]["weights_sha256"]) == 64
    assert "/v1/search" in client.get("/openapi.json").json()["paths"]


# ---------------------------------------------------------------------------- no index, keys, mismatch
def test_without_an_index_the_route_says_how_to_load_one(world):
    with TestClient(app_for(world, index="none")) as c:
        r = c.post("/v1/search", json={"vectors": [[1.0] * 64]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_index"
        assert "--index DIR" in r.json()["error"]["message"]
        assert c.get("/v1/info").json()["index"] is None
    with TestClient(app_for(world, index="auto")) as c:  # auto: not the bundled model -> no index
        assert c.post("/search", json={"vectors": [[1.0] * 64]}).status_code == 404


def test_api_keys_guard_the_search_as_the_other_routes(world):
    with TestClient(app_for(world, api_keys="secret-key")) as c:
        r = c.post("/v1/search", json={"vectors": [[1.0] * 64]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = c.post("/search", json={"vectors": [[1.0] * 64]}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post(
            "/v1/search", json={"vectors": [[1.0] * 64]}, headers={"Authorization": "Bearer secret-key"}
        )
        assert r.status_code == 200


def test_another_models_index_stops_the_server_saying_what_differs(world, tmp_path, capsys):
    other = tiny_checkpoint(tmp_path / "other")  # same architecture, different weights file
    (other / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(SearchIndexError, match=r"weights digest .* index [0-9a-f]{12} vs served model"):
        create_app(settings(other, backend="torch", index=str(world["index"])))
    from supmae_serve.cli import main

    code = main(["--model", str(other), "--index", str(world["index"]), "--no-demo", "--check"])
    err = capsys.readouterr().err
    assert code == 2 and "supmae-serve: error: cannot serve --index" in err and "weights digest" in err
    code = main(["--model", str(world["ckpt"]), "--index", str(world["index"]), "--no-demo", "--check"])
    checked = json.loads(capsys.readouterr().out)
    assert code == 0 and checked["index"]["count"] == 8 and checked["index"]["path"].startswith("[redacted]/")
    with pytest.raises(SearchIndexError, match="not an index"):
        create_app(settings(world["ckpt"], backend="torch", index=str(tmp_path)))


def test_a_dimension_mismatch_is_named(world, tmp_path):
    from supmae_serve.features.gallery import load_served_index
    from supmae_serve.features.identity import IdentityError
    from supmae_serve.model import load_model_card

    card = load_model_card(world["ckpt"] / "model.json")
    card.config.embed_dim = 32  # as if another architecture
    with pytest.raises(IdentityError, match="embedding dimension: index 64 vs served model 32"):
        load_served_index(world["index"], card, world["ckpt"])


# ---------------------------------------------------------------------------- the shipped gallery
def test_the_bundled_model_serves_the_shipped_gallery_by_default():
    assert resolve_index_spec("auto", DEFAULT_MODEL) == GALLERY_INDEX
    assert resolve_index_spec("none", DEFAULT_MODEL) is None
    with TestClient(create_app(settings(DEFAULT_MODEL, backend="torch"))) as c:
        info = c.get("/v1/info").json()["index"]
        assert info["count"] == 1000 and info["dim"] == 192
        query = sorted((GALLERY_DIR / "images" / "ship").glob("*.jpg"))[3]
        r = c.post("/v1/search?top_k=5", content=query.read_bytes(), headers={"content-type": "image/jpeg"})
        found = r.json()["data"][0]["neighbors"]
        assert found[0]["id"] == f"ship/{query.name}" and found[0]["score"] > 0.999  # stored as float16
        assert (GALLERY_INDEX / found[0]["source"]).resolve() == query.resolve()
    with TestClient(create_app(settings(DEFAULT_MODEL, backend="torch", index="none"))) as c:
        assert c.get("/v1/info").json()["index"] is None


def test_the_shipped_gallery_is_small_relocatable_and_recorded():
    files = [p for p in GALLERY_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 3 * 2**20
    assert len([p for p in files if p.suffix == ".jpg"]) == 1000
    manifest = json.loads((GALLERY_INDEX / "index.json").read_text())
    assert manifest["command"].startswith("supmae-embed index features --out index --relative-sources")
    assert manifest["sources"] == {"relative_to_index": True, "roots": ["../images"], "local_files": True}
    feats = json.loads((GALLERY_DIR / "features" / "features.json").read_text())
    assert feats["run"]["command"].startswith("supmae-embed run images --out features")
    index = FeatureIndex.load(GALLERY_INDEX)
    files_ = SourceFiles(index.path, index.manifest)
    assert all(files_.path(s).is_file() for s in index.sources)  # every neighbour can be shown
    assert {lab for lab in index.labels} == {p.name for p in (GALLERY_DIR / "images").iterdir()}


# ---------------------------------------------------------------------------- files outside the root
def test_only_files_inside_the_recorded_image_folder_are_shown(world, tmp_path):
    index = FeatureIndex.load(world["index"])
    files = SourceFiles(index.path, index.manifest)
    assert files.local_files and files.roots == [world["images"].resolve()]
    assert files.path("../images/cat/1.png") == (world["images"] / "cat" / "1.png").resolve()
    outside = world["root"] / "secret.png"
    outside.write_bytes(encode(synthetic_image()))
    link = world["images"] / "cat" / "link.png"
    if not link.exists():
        os.symlink(outside, link)
    for source, why in [
        (str(outside), "outside"),
        ("../secret.png", "outside"),
        ("../images/../secret.png", "outside"),
        ("../images/cat/link.png", "outside"),  # a link inside that points outside
        ("/etc/passwd", "outside"),
        ("../images/cat/nope.png", "not an existing file"),
        ("http://example.com/x.png", "not a local file"),
        ("", "not a local file"),
    ]:
        with pytest.raises(SourceRefused, match=why):
            files.path(source)
    assert not SourceFiles(tmp_path, {"sources": {}}).local_files  # an index that records no folder
    with pytest.raises(SourceRefused, match="records no folder"):
        SourceFiles(tmp_path, {}).path(str(outside))


def test_relative_sources_survive_adding_a_feature_set_and_the_cli_records_its_command(world, tmp_path):
    import shutil

    from supmae_serve.features.cli import main as embed_main
    from supmae_serve.features.index import add_to_index

    more = tmp_path / "more"
    (more / "bird").mkdir(parents=True)
    synthetic_image((40, 40), seed=77).save(more / "bird" / "0.png")
    feats = embed_folder(more, world["ckpt"], tmp_path / "more-feats")
    index_dir = tmp_path / "copy" / "index"
    assert (
        embed_main(
            [
                "index",
                str(world["root"] / "gallery" / "features"),
                "--out",
                str(index_dir),
                "--relative-sources",
            ]
        )
        == 0
    )
    manifest = json.loads((index_dir / "index.json").read_text())
    assert manifest["command"].endswith(f"--out {index_dir} --relative-sources")
    add_to_index(index_dir, [feats])
    index = FeatureIndex.load(index_dir)
    assert index.sources[-1] == Path(os.path.relpath(more / "bird" / "0.png", index_dir)).as_posix()
    rec = index.manifest["sources"]
    assert rec["relative_to_index"] and rec["local_files"] and len(rec["roots"]) == 2
    files = SourceFiles(index.path, index.manifest)
    assert files.path(index.sources[-1]) == (more / "bird" / "0.png").resolve()
    # the index and the images move together: a copy of the whole tree still resolves
    shutil.copytree(tmp_path / "copy", tmp_path / "moved")
    assert SourceFiles(tmp_path / "moved" / "index", index.manifest).path(index.sources[0]).is_file()


def test_large_search_bodies_are_parsed_off_the_event_loop(client, monkeypatch):
    """As on the image routes: a JSON body over inputs.PARSE_OFF_LOOP_BYTES is parsed on the decode pool."""
    import threading

    from supmae_serve.api import inputs, search

    threads = []
    parse = search._parse_json

    def recording(body, limits):
        threads.append(threading.current_thread().name)
        return parse(body, limits)

    monkeypatch.setattr(search, "_parse_json", recording)
    dim = client.get("/v1/info").json()["index"]["dim"]
    rng = np.random.default_rng(0)
    small = rng.standard_normal((1, dim)).round(3).tolist()
    big = (
        json.dumps({"vectors": small, "top_k": 2}) + " " * inputs.PARSE_OFF_LOOP_BYTES
    )  # valid JSON, > limit
    assert client.post("/v1/search", json={"vectors": small, "top_k": 2}).status_code == 200
    r = client.post("/v1/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert not threads[0].startswith("supmae-decode")  # small: parsed in place
    assert threads[1].startswith("supmae-decode")
