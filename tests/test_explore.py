"""`sdfeat explore` endpoints (FastAPI TestClient): maps and top-k against independent numpy computations from
`open_store().read`, anomalies and labels, thumbnails vs the extractor's decoding, a store still being written,
crop variants, an s3 store, and bad requests (4xx JSON, never a traceback; no file outside the stores)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import imagegen
from conftest import small_spec
from sdfeat import store
from sdfeat.explore.app import create_app
from sdfeat.store.query import open_store
from test_remote_store import BUCKET, s3_env  # noqa: F401  (the moto S3 fixture)

BLOCK = "up_blocks.1.upsamplers.0"  # (64, 8, 8) in the tiny store at 128 px


def _client(*paths: str) -> TestClient:
    return TestClient(create_app(list(paths)), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tiny_store: str) -> TestClient:
    return _client(tiny_store)


def _cosine(acts: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Independent reference: (C, H, W) float64 tokens vs a (C,) vector, written out by hand."""
    c, h, w = acts.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            t = acts[:, y, x]
            out[y, x] = t @ vector / (np.sqrt(t @ t) * np.sqrt(vector @ vector))
    return out


@pytest.mark.parametrize(("row", "t", "y", "x"), [(0, 50, 3, 4), (7, 200, 0, 7), (11, 50, 7, 0)])
def test_similarity_map_equals_numpy(client: TestClient, tiny_store: str, row: int, t: int, y: int, x: int) -> None:
    acts = open_store(tiny_store).read(BLOCK, [row], timestep=t, seed=42)[0].astype(np.float64)  # (C, H, W)
    r = client.get("/api/stores/0/similarity", params={"block": BLOCK, "row": row, "t": t, "y": y, "x": x})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shape"] == [8, 8]
    np.testing.assert_allclose(np.array(body["values"]), _cosine(acts, acts[:, y, x]), atol=2e-6)
    assert body["token"]["norm"] == pytest.approx(np.sqrt(acts[:, y, x] @ acts[:, y, x]), rel=1e-5)


def test_norm_map_equals_numpy_and_defaults_to_the_first_timestep(client: TestClient, tiny_store: str) -> None:
    acts = open_store(tiny_store).read("conv_in", [5], timestep=50, seed=42)[0].astype(np.float64)
    body = client.get("/api/stores/0/norm", params={"block": "conv_in", "row": 5}).json()
    expected = np.sqrt((acts ** 2).sum(axis=0))
    np.testing.assert_allclose(np.array(body["values"]), expected, rtol=1e-5)
    assert body["vmax"] == pytest.approx(expected.max(), rel=1e-5)
    assert body["threshold"]["images"] == 12


def test_top_k_equals_brute_force(client: TestClient, tiny_store: str) -> None:
    features = open_store(tiny_store)
    acts = features.read(BLOCK, timestep=200, seed=42).astype(np.float64)  # (12, C, 8, 8)
    query = acts[4, :, 2, 6]
    r = client.get("/api/stores/0/topk", params={"block": BLOCK, "row": 4, "t": 200, "y": 2, "x": 6, "k": 5,
                                                 "start": 0, "n": 12})
    body = r.json()
    assert [im["row"] for im in body["images"]] == [i for i in range(12) if i != 4]
    for image in body["images"]:
        sims = _cosine(acts[image["row"]], query).ravel()
        best = np.argsort(-sims)[:5]
        assert [(m["y"], m["x"]) for m in image["matches"]] == [(int(j // 8), int(j % 8)) for j in best]
        np.testing.assert_allclose([m["similarity"] for m in image["matches"]], sims[best], atol=2e-6)
        assert image["id"] == features.sample_ids[image["row"]]
    window = client.get("/api/stores/0/topk", params={"block": BLOCK, "row": 4, "y": 2, "x": 6, "start": 3,
                                                      "n": 3}).json()
    assert [im["row"] for im in window["images"]] == [3, 5]  # rows 3..5 without the query's own row


def test_store_list_and_samples_describe_the_store(client: TestClient, tiny_store: str) -> None:
    meta = client.get("/api/stores").json()[0]
    features = open_store(tiny_store)
    assert meta["samples"] == meta["finished"] == meta["ok"] == 12 and meta["units_done"] == meta["units"] == 3
    assert meta["timesteps"] == [50, 200] and meta["seeds"] == [42] and meta["crops"] == []
    assert {b["name"]: b["shape"] for b in meta["blocks"]} == {b: list(features.shape(b)[-3:]) for b in features.blocks}
    page = client.get("/api/stores/0/samples", params={"offset": 10, "limit": 5}).json()
    assert [i["row"] for i in page["items"]] == [10, 11]
    assert page["items"][0] == {"row": 10, "id": features.sample_ids[10], "label": int(features.labels[10]),
                                "label_name": features.attrs.class_names[int(features.labels[10])], "finished": True,
                                "ok": True, "reason": None}


def test_thumbnail_is_the_extractors_image(client: TestClient, tiny_store: str) -> None:
    from sdfeat.sources import plan_samples, read_images

    refs = plan_samples("synthetic:12").refs
    expected = next(read_images([refs[6]], 128)).pixels  # what the extractor fed the model
    r = client.get("/api/stores/0/samples/6/image.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected)
    small = Image.open(io.BytesIO(client.get("/api/stores/0/samples/6/image.png", params={"size": 32}).content))
    assert small.size == (32, 32)


def test_planted_anomaly_is_detected_and_stored_labels_are_scaled(tiny_store: str, tmp_path: Path) -> None:
    output = str(tmp_path / "planted")
    shutil.copytree(tiny_store, output)
    group = store.open_features(output, mode="r+")
    values = group[BLOCK][3]  # (T, S, C, 8, 8)
    values[0, 0, :, 4, 6] *= 40  # one bright token in row 3 at t=50: its 2x2 cell is (y=4, x=6)
    group[BLOCK][3] = values
    results = Path(output) / "results"
    results.mkdir()
    pq.write_table(pa.table({"sample": [3, 5], "sample_id": ["a", "b"], "x": [2, 0], "y": [6, 0],
                             "peak_ratio": [9.0, 9.0]}), results / "anomalies_detected.parquet")
    client = _client(output)
    body = client.get("/api/stores/0/norm", params={"block": BLOCK, "row": 3}).json()
    assert [(a["y"], a["x"], a["size"]) for a in body["anomalies"]] == [(4, 6, 2)]
    assert body["labels"] == [{"y": 6, "x": 2, "size": 2}]  # the label map is this block's own (8 x 8)
    conv = client.get("/api/stores/0/norm", params={"block": "conv_in", "row": 3}).json()  # 16 x 16: scale 2
    assert conv["labels"] == [{"y": 12, "x": 4, "size": 4}]
    assert client.get("/api/stores/0/norm", params={"block": BLOCK, "row": 4}).json()["anomalies"] == []


def test_a_store_being_written_serves_finished_rows_only(tiny_store: str, tmp_path: Path) -> None:
    output = str(tmp_path / "writing")
    shutil.copytree(tiny_store, output)
    Path(store.marker_path(output, 1)).unlink()  # unit 1 (rows 4..7) not done yet
    client = _client(output)
    meta = client.get("/api/stores/0").json()
    assert (meta["finished"], meta["units_done"], meta["units"]) == (8, 2, 3)
    items = client.get("/api/stores/0/samples", params={"limit": 12}).json()["items"]
    assert [i["row"] for i in items if not i["finished"]] == [4, 5, 6, 7]
    r = client.get("/api/stores/0/similarity", params={"block": BLOCK, "row": 5, "y": 0, "x": 0})
    assert r.status_code == 409 and "not finished" in r.json()["detail"]
    topk = client.get("/api/stores/0/topk", params={"block": BLOCK, "row": 0, "y": 1, "x": 1, "n": 12}).json()
    assert [im["row"] for im in topk["images"]] == [1, 2, 3, 8, 9, 10, 11]


def test_a_failed_row_is_refused_with_409(tiny_store: str, tmp_path: Path) -> None:
    output = str(tmp_path / "failed")
    shutil.copytree(tiny_store, output)
    group = store.open_features(output, mode="r+")
    ok = group["ok"][:]
    ok[2] = False
    group["ok"][:] = ok
    client = _client(output)
    r = client.get("/api/stores/0/norm", params={"block": BLOCK, "row": 2})
    assert r.status_code == 409 and "failed" in r.json()["detail"]
    assert client.get("/api/stores/0").json()["failed"] == 1


def test_failure_rows_show_as_failed_with_their_recorded_reason(tmp_path: Path) -> None:
    """A folder source with a broken link (planned unusable: the manifest's `error`) and a file that is no image
    (fails at decoding): both rows are refused with 409 and the reason failures.parquet records, never read as
    ordinary images; the good rows still come back."""
    from sdfeat.errors import RowNotReadyError
    from sdfeat.explore.images import SourceImages
    from sdfeat.extract import run_local

    classes = imagegen.write_ilsvrc_folders(tmp_path / "src", synsets=("n01000000",), per_class=2)
    (classes / "n01000000" / "gone.JPEG").symlink_to(classes / "n01000000" / "nowhere.JPEG")
    (classes / "n01000000" / "text.JPEG").write_bytes(b"<html>404 not found</html>")
    output = str(tmp_path / "out")
    run_local(small_spec(output, source=str(classes), blocks=[BLOCK], timesteps=[50], unit_size=8), progress=False,
              device="cpu")
    features = open_store(output)
    recorded = {f["sample_id"]: f["reason"] for f in pq.read_table(f"{output}/failures.parquet").to_pylist()}
    assert sorted(recorded) == ["n01000000/gone.JPEG", "n01000000/text.JPEG"]
    assert "broken link" in recorded["n01000000/gone.JPEG"]
    assert "not a recognised image" in recorded["n01000000/text.JPEG"]
    row = {sid: i for i, sid in enumerate(features.sample_ids)}
    client = _client(output)
    items = {i["id"]: i for i in client.get("/api/stores/0/samples").json()["items"]}
    for sid, reason in recorded.items():
        assert items[sid]["finished"] and not items[sid]["ok"] and items[sid]["reason"] == reason
        for path in (f"/api/stores/0/samples/{row[sid]}/image.png", f"/api/stores/0/norm?block={BLOCK}&row={row[sid]}"):
            r = client.get(path)
            assert r.status_code == 409, (path, r.text)
            assert "failed" in r.json()["detail"] and reason in r.json()["detail"], r.json()
    for sid in ("n01000000/n01000000_0.JPEG", "n01000000/n01000000_1.JPEG"):
        assert items[sid]["ok"] and items[sid]["reason"] is None
        r = client.get(f"/api/stores/0/samples/{row[sid]}/image.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    # below the view (a row of a job still running): a planned-unusable ref is never opened, its reason comes back
    images = SourceImages(output, features.spec.resolution, len(features))
    with pytest.raises(RowNotReadyError, match="broken link"):
        images.pixels(row["n01000000/gone.JPEG"])


@pytest.fixture(scope="module")
def crop_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from sdfeat.extract import run_local

    output = str(tmp_path_factory.mktemp("stores") / "crops")
    run_local(small_spec(output, source="synthetic:4", timesteps=[50], blocks=["conv_in", BLOCK],
                         variants={"crops": "auto"}), progress=False, device="cpu")
    return output


def test_crop_variant_maps_and_image(crop_store: str) -> None:
    features = open_store(crop_store)
    client = _client(crop_store)
    meta = client.get("/api/stores/0").json()
    assert {b["name"]: b["crops"] for b in meta["blocks"]} == {"conv_in": [8], BLOCK: [16]}
    acts = features.read(BLOCK, [1], timestep=50, seed=42, crop=16)[0].astype(np.float64)  # (C, 6, 6)
    body = client.get("/api/stores/0/similarity", params={"block": BLOCK, "row": 1, "y": 2, "x": 3,
                                                          "crop": 16}).json()
    assert body["shape"] == [6, 6]
    np.testing.assert_allclose(np.array(body["values"]), _cosine(acts, acts[:, 2, 3]), atol=2e-6)
    norm = client.get("/api/stores/0/norm", params={"block": BLOCK, "row": 1, "crop": 16}).json()
    np.testing.assert_allclose(np.array(norm["values"]), np.sqrt((acts ** 2).sum(axis=0)), rtol=1e-5)
    full = np.asarray(Image.open(io.BytesIO(client.get("/api/stores/0/samples/1/image.png").content)))
    cropped = np.asarray(Image.open(io.BytesIO(client.get("/api/stores/0/samples/1/image.png",
                                                          params={"crop": 16, "size": 96}).content)))
    np.testing.assert_array_equal(cropped, full[16:-16, 16:-16])  # 96 px: no resize
    r = client.get("/api/stores/0/norm", params={"block": "conv_in", "row": 1, "crop": 16})
    assert r.status_code == 404 and "crop" in r.json()["detail"]


BAD_REQUESTS = [
    ("/api/stores/1", 404, "out of range"),
    ("/api/stores/-1/samples", 404, "out of range"),
    ("/api/stores/0/norm?block=up_blocks.3.resnets.0&row=0", 404, "stored blocks"),
    ("/api/stores/0/norm?block=conv_in&row=12", 404, "out of range"),
    ("/api/stores/0/norm?block=conv_in&row=-1", 404, "out of range"),
    ("/api/stores/0/norm?block=conv_in&row=0&crop=8", 404, "crop"),
    ("/api/stores/0/norm?block=conv_in&row=0&t=999", 404, "timestep"),
    ("/api/stores/0/norm?block=conv_in&row=0&seed=7", 404, "seed"),
    ("/api/stores/0/norm?block=conv_in&row=x", 422, "row"),
    ("/api/stores/0/norm?row=0", 422, "block"),
    ("/api/stores/0/similarity?block=conv_in&row=0&y=16&x=0", 400, "outside"),
    ("/api/stores/0/topk?block=conv_in&row=0&y=0&x=0&n=100000", 422, "n"),
    ("/api/stores/0/topk?block=conv_in&row=0&y=0&x=0&k=0", 422, "k"),
    ("/api/stores/0/samples/0/image.png?size=100000", 400, "size"),
    ("/api/stores/0/samples/99/image.png", 404, "out of range"),
    ("/api/stores/0/samples?limit=100000", 422, "limit"),
    ("/api/stores/0/norm?block=../../../etc/passwd&row=0", 404, "block"),
    ("/api/stores/0/norm?block=%2Fetc%2Fpasswd&row=0", 404, "block"),
    ("/api/stores/0/norm?block=..%2Fmanifest.parquet&row=0", 404, "block"),
    ("/api/stores/0/norm?block=features.zarr&row=0", 404, "block"),
    ("/api/stores/..%2F..%2Fetc/norm?block=conv_in&row=0", 404, "Not Found"),
    ("/api/stores/abc", 422, "s: "),
]


@pytest.mark.parametrize(("url", "status", "word"), BAD_REQUESTS)
def test_bad_requests_get_4xx_json_with_a_message(client: TestClient, url: str, status: int, word: str) -> None:
    r = client.get(url)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert word in r.json()["detail"] and "Traceback" not in r.text


def test_no_file_outside_the_static_folder_or_the_stores_is_served(client: TestClient, tiny_store: str) -> None:
    secret = Path(tiny_store).parent / "secret.txt"
    secret.write_text("do not serve")
    try:
        for path in ["/static/../secret.txt", "/static/%2e%2e/%2e%2e/pyproject.toml", "/static/..%2f..%2fcli.py",
                     "/static/..%5c..%5capp.py", f"/static/{secret}", f"/static/%2F{str(secret).lstrip('/')}",
                     "/features.zarr/zarr.json", "/manifest.parquet", f"/{tiny_store}/manifest.parquet",
                     "/api/stores/0/manifest.parquet", "/static/", "/static"]:
            r = client.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert "do not serve" not in r.text and "sdfeat" not in r.text.lower()
        assert client.get("/static/main.js").status_code == 200
        assert client.post("/api/stores/0/norm?block=conv_in&row=0").status_code == 405  # read-only
    finally:
        secret.unlink()


def test_cli_refuses_a_path_without_a_store(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdfeat.cli.app import app

    result = CliRunner().invoke(app, ["explore", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no feature store" in result.output


@pytest.fixture(scope="module")
def s3_store(tiny_store: str, s3_env: dict[str, str]) -> str:
    """tiny_store copied into the moto S3 server of `s3_env` (127.0.0.1; AWS_* set while the module runs)."""
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).put(tiny_store, f"{BUCKET}/explore/tiny", recursive=True)
    return f"s3://{BUCKET}/explore/tiny"


def test_an_s3_store_gives_the_same_maps(s3_store: str, client: TestClient) -> None:
    remote = _client(s3_store)
    params = {"block": BLOCK, "row": 9, "y": 5, "x": 2}
    assert remote.get("/api/stores/0").json()["finished"] == 12
    assert remote.get("/api/stores/0/similarity", params=params).json() == \
        client.get("/api/stores/0/similarity", params=params).json()
    assert remote.get("/api/stores/0/samples/9/image.png").content == \
        client.get("/api/stores/0/samples/9/image.png").content


def test_rows_appear_as_their_units_finish_on_s3(s3_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    from sdfeat.explore import views

    fs = fsspec.filesystem("s3")
    marker = store.marker_path(s3_store, 2).removeprefix("s3://")
    report = fs.cat_file(marker)
    fs.rm(marker)  # unit 2 (rows 8..11) still being written
    client = _client(s3_store)
    assert client.get("/api/stores/0").json()["finished"] == 8
    assert client.get("/api/stores/0/norm", params={"block": BLOCK, "row": 9}).status_code == 409
    fs.pipe_file(marker, report)  # the unit finishes
    monkeypatch.setattr(views, "STATUS_TTL_S", 0.0)
    assert client.get("/api/stores/0").json()["finished"] == 12
    assert client.get("/api/stores/0/norm", params={"block": BLOCK, "row": 9}).status_code == 200
