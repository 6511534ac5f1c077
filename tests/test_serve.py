"""Serving: a real bank, a real trained CTR model and the tiny prepared data behind the FastAPI app.

The world (built once per module): RUN/data (the conftest tiny CSV dataset, prepared), RUN/bank.sqlite from a
hand-written profile_ids table, RUN/ctr from ``train_ctr`` (dcn + din, variant +ids, 1 seed, 2 epochs) and a
hand-written RUN/explanations.json. User "10" is in the data but not in the bank.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from userip.bank import import_parquet
from userip.ctr import load_model
from userip.data import ctr_examples, prepare
from userip.errors import UseripError
from userip.serve import CTRScorer, create_app

try:  # tests/ as a plain directory (conftest on sys.path) or as a package (tests/__init__.py)
    from conftest import make_tiny, write_csv
except ModuleNotFoundError:  # pragma: no cover - depends on the layout
    from tests.conftest import make_tiny, write_csv

HOBBY = {str(u): 1 + u % 4 for u in range(1, 10)}  # users 1..9; user 10 is not in the bank
BACKGROUND = {str(u): 1 + u % 3 for u in range(1, 10)}
CODEBOOK_HASH = "cb-hash-1"
WORDS = {("hobby", c): [f"hobby-word-{c}", "chess"] for c in range(1, 5)} | {
    ("background", c): [f"bg-word-{c}"] for c in range(1, 4)
}


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _bank_meta(fingerprint: str, codebook_hash: str = CODEBOOK_HASH) -> dict:
    return {
        "model": "test",
        "template": "test",
        "codebook_hash": codebook_hash,
        "profiles": [{"name": "hobby", "size": 4}, {"name": "background", "size": 3}],
        "data_fingerprint": fingerprint,
    }


def _write_bank(path: Path, fingerprint: str, *, hobby=HOBBY, codebook_hash: str = CODEBOOK_HASH) -> None:
    table = pd.DataFrame(
        {
            "user_id": list(hobby),
            "hobby": np.array(list(hobby.values()), dtype=np.int64),
            "background": np.array([BACKGROUND[u] for u in hobby], dtype=np.int64),
        }
    )
    pq = path.with_suffix(".parquet")
    table.to_parquet(pq, index=False)
    import_parquet(pq, path, meta=_bank_meta(fingerprint, codebook_hash)).close()


def _explanations() -> dict:
    profiles = {}
    for name, k in (("hobby", 4), ("background", 3)):
        profiles[name] = {
            "n_tokens": 1,
            "codebook_size": k,
            "codes": [
                {
                    "code": c,
                    "users": 1,
                    "tokens": WORDS[(name, c)],
                    "phrase": f"a {name} phrase {c}",
                    "genres": [{"genre": "Drama", "lift": 1.5}],
                    "titles": [{"title": f"Movie {c}", "lift": 2.0}],
                }
                for c in range(1, k + 1)
            ],
        }
    return {"profiles_dir": "/nonexistent", "model": "test", "profiles": profiles}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from userip.ctr import train_ctr

    run = tmp_path_factory.mktemp("serve") / "run"
    csv = write_csv(make_tiny(), run.parent / "csv")
    data = prepare(run / "data", interactions=csv.interactions, items=csv.items, users=csv.users, config=csv.config)
    _write_bank(run / "bank.sqlite", data.fingerprint)
    torch.set_num_threads(1)
    train_ctr(
        run / "data", run / "bank.sqlite", backbones="dcn,din", seeds=1, variants="+ids", settings="with_user_id",
        out=run / "ctr", max_epochs=2, batch_size=64, progress=False,
    )
    (run / "explanations.json").write_text(json.dumps(_explanations()))
    return SimpleNamespace(run=run, data=data, bank=run / "bank.sqlite", ctr=run / "ctr")


@pytest.fixture(scope="module")
def client(world):
    app = create_app(str(world.bank), world.ctr, max_batch=50)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


# ---------------------------------------------------------------------------------------------- direct model
def _history(data, user_idx: int, h: int = 20) -> np.ndarray:
    """The user's h most recent items over every split, most recent last, 0-padded on the left."""
    inter = data.interactions[data.interactions["user_idx"] == user_idx].sort_values("timestamp", kind="stable")
    items = inter["item_idx"].to_numpy()[-h:] if h else []
    out = np.zeros(h, dtype=np.int64)
    if len(items):
        out[-len(items) :] = items
    return out


def _direct_scores(world, backbone: str, user_id: str, item_ids: list[str]) -> np.ndarray:
    """What the trained model says, with inputs built here independently of userip.serve."""
    data = world.data
    model = load_model(world.ctr / "models" / f"{backbone}.safetensors")
    u = int(data.user_index([user_id])[0])
    items = data.item_index(item_ids)
    n = len(items)
    vocab = data.genre_vocab
    g_max = max(len(gs) for gs in data.items["genres"])
    genres = np.zeros((n, g_max), dtype=np.int64)
    by_idx = dict(zip(data.items["item_idx"], data.items["genres"], strict=True))
    for r, i in enumerate(items):
        for j, g in enumerate(by_idx[int(i)]):
            genres[r, j] = vocab.index(g) + 1
    ex = ctr_examples(data, "all")
    rows = np.flatnonzero(ex.user == u)
    inputs = {
        "user": torch.full((n,), u),
        "item": torch.from_numpy(items),
        "genres": torch.from_numpy(genres),
        "history": torch.from_numpy(np.tile(_history(data, u), (n, 1))),
        "profile:hobby": torch.full((n,), HOBBY.get(user_id, 0)),
        "profile:background": torch.full((n,), BACKGROUND.get(user_id, 0)),
    }
    for f, codes in ex.side.items():
        inputs[f"side:{f}"] = torch.full((n,), int(codes[rows[0]]) if len(rows) else 0)
    with torch.no_grad():
        return torch.sigmoid(model(inputs)).numpy()


# ---------------------------------------------------------------------------------------------- endpoints
def test_healthz_and_meta(client, world):
    assert client.get("/healthz").json() == {"status": "ok"}
    meta = client.get("/v1/meta").json()
    assert meta["backbone"] == "dcn" and meta["variant"] == "+ids"  # first +ids model by name
    assert [(p["name"], p["size"]) for p in meta["profiles"]] == [("hobby", 4), ("background", 3)]
    assert (meta["n_users"], meta["n_items"]) == (10, 30)
    assert meta["max_batch"] == 50
    assert meta["bank"]["meta"]["data_fingerprint"] == world.data.fingerprint
    assert meta["data"]["path"] == str(world.run / "data")  # found from results.json, no --data given
    assert meta["explanations"] == str(world.run / "explanations.json")
    assert {"user", "item", "genres", "history", "profile:hobby", "profile:background"} <= set(meta["model"]["fields"])


def test_profile_known_user_with_explanations(client):
    r = client.get("/v1/users/3/profile")
    assert r.status_code == 200
    body = r.json()
    assert body["user_id"] == "3" and body["known"] is True
    hobby, bg = body["profiles"]["hobby"], body["profiles"]["background"]
    assert hobby["id"] == HOBBY["3"] and bg["id"] == BACKGROUND["3"]
    assert hobby["words"] == WORDS[("hobby", HOBBY["3"])]
    assert hobby["phrase"] == f"a hobby phrase {HOBBY['3']}"
    assert hobby["genres"] == ["Drama"] and hobby["titles"] == [f"Movie {HOBBY['3']}"]


@pytest.mark.parametrize("user_id", ["nobody", "10", "a%2Fb"])  # unknown / in the data but not the bank / a "/"
def test_profile_unknown_user(client, user_id):
    body = client.get(f"/v1/users/{user_id}/profile").json()
    assert body["user_id"] == user_id.replace("%2F", "/") and body["known"] is False
    for entry in body["profiles"].values():
        assert entry["id"] == 0 and entry["words"] == [] and entry["phrase"] is None


def test_score_known_user_matches_the_model(client, world):
    items = ["5", "1", "30", "5", "12"]  # duplicates allowed, order kept
    r = client.post("/v1/score", json={"user_id": "4", "item_ids": items})
    assert r.status_code == 200
    body = r.json()
    assert body["user_id"] == "4" and body["known_user"] is True and body["unknown_items"] == []
    assert [s["item_id"] for s in body["scores"]] == items
    scores = np.array([s["score"] for s in body["scores"]])
    assert ((scores > 0) & (scores < 1)).all()
    assert scores[0] == scores[3]
    assert body["profile_ids"] == {"hobby": HOBBY["4"], "background": BACKGROUND["4"]}
    np.testing.assert_allclose(scores, _direct_scores(world, "dcn", "4", items), rtol=1e-5, atol=1e-6)


def test_score_unknown_user_gets_id_zero(client, world):
    items = ["2", "7", "9"]
    body = client.post("/v1/score", json={"user_id": "nobody", "item_ids": items}).json()
    assert body["known_user"] is False
    assert body["profile_ids"] == {"hobby": 0, "background": 0}
    scores = np.array([s["score"] for s in body["scores"]])
    np.testing.assert_allclose(scores, _direct_scores(world, "dcn", "nobody", items), rtol=1e-5, atol=1e-6)


def test_score_user_in_data_but_not_in_bank(client, world):
    body = client.post("/v1/score", json={"user_id": "10", "item_ids": ["3"]}).json()
    assert body["known_user"] is True and body["profile_ids"] == {"hobby": 0, "background": 0}
    np.testing.assert_allclose(body["scores"][0]["score"], _direct_scores(world, "dcn", "10", ["3"])[0], rtol=1e-5)


def test_score_accepts_json_numbers_as_ids(client):
    """A client of a MovieLens-style log sends numbers; they score exactly as their string form (issue 13)."""
    as_str = client.post("/v1/score", json={"user_id": "4", "item_ids": ["5", "1", "30"]}).json()
    r = client.post("/v1/score", json={"user_id": 4, "item_ids": [5, 1.0, "30"]})
    assert r.status_code == 200, r.text
    assert r.json() == as_str
    assert r.json()["known_user"] is True


def test_unknown_items_are_reported_not_scored(client):
    body = client.post("/v1/score", json={"user_id": "2", "item_ids": ["nope", "1", "31", "2", "nope"]}).json()
    assert [s["item_id"] for s in body["scores"]] == ["1", "2"]
    assert body["unknown_items"] == ["nope", "31", "nope"]
    body = client.post("/v1/score", json={"user_id": "2", "item_ids": ["x"]}).json()
    assert body["scores"] == [] and body["unknown_items"] == ["x"]


BAD_BODIES = [
    ({"item_ids": ["1"]}, 422, "user_id"),
    ({"user_id": "1"}, 422, "item_ids"),
    ({"user_id": "1", "item_ids": []}, 422, "at least 1"),
    ({"user_id": True, "item_ids": ["1"]}, 422, "user_id"),  # numbers are ids (below); booleans are not
    ({"user_id": "1", "item_ids": [1.5, 2]}, 422, "item_ids.0"),  # nor fractions: "1.5" or "1.50"?
    ({"user_id": "1", "item_ids": "1"}, 422, "item_ids"),
    ({"user_id": "1", "item_ids": [["1"]]}, 422, "item_ids.0"),
    ({"user_id": None, "item_ids": ["1"]}, 422, "user_id"),
    ({"user_id": "", "item_ids": ["1"]}, 422, "user_id"),
    ({"user_id": "1", "item_ids": ["x" * 300]}, 422, "item_ids.0"),
    ({"user_id": "1", "item_ids": ["1"], "extra": 1}, 422, "extra"),
    (["not", "an", "object"], 422, "body"),
    ({"user_id": "1", "item_ids": ["1"] * 51}, 413, "at most 50"),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD_BODIES)
def test_bad_requests_are_4xx_and_the_server_keeps_answering(client, body, status, needle):
    r = client.post("/v1/score", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert needle in err["message"] and err["error"]
    ok = client.post("/v1/score", json={"user_id": "1", "item_ids": ["1"]})
    assert ok.status_code == 200


def test_malformed_json_oversized_body_and_unknown_route(client):
    headers = {"content-type": "application/json"}
    r = client.post("/v1/score", content=b'{"user_id": "1", "item_ids": [', headers=headers)
    assert r.status_code == 422 and "JSON" in r.json()["message"]
    r = client.post("/v1/score", content=b"x" * 400_000, headers=headers)
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert client.get("/v1/users/" + "x" * 300 + "/profile").status_code == 422
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/score").status_code == 405
    assert client.post("/v1/score", json={"user_id": "1", "item_ids": ["1"]}).status_code == 200


def test_internal_error_is_a_logged_500_and_not_fatal(client, monkeypatch, caplog):
    scorer = client.app.state.scorer

    def boom(*_a, **_k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(scorer, "score", boom)
    monkeypatch.setattr(scorer, "profile", boom)
    r = client.post("/v1/score", json={"user_id": "1", "item_ids": ["1"]})
    assert r.status_code == 500 and r.json()["error"] == "internal_error" and "kaboom" not in r.text
    assert client.get("/v1/users/1/profile").status_code == 500
    assert "kaboom" in caplog.text
    monkeypatch.undo()
    assert client.post("/v1/score", json={"user_id": "1", "item_ids": ["1"]}).status_code == 200


# ---------------------------------------------------------------------------------------------- loading
def test_backbone_choice_and_scorer_api(world):
    scorer = CTRScorer(str(world.bank), world.ctr, backbone="din")
    try:
        assert scorer.backbone == "din" and "history" in scorer.fields
        res = scorer.score("6", ["4", "8"])
        np.testing.assert_allclose(res.scores, _direct_scores(world, "din", "6", ["4", "8"]), rtol=1e-5, atol=1e-6)
        pairs = scorer.score_pairs(["6", "6", "nobody"], ["4", "nope", "8"])
        np.testing.assert_allclose(pairs[0], res.scores[0], rtol=1e-6)
        assert np.isnan(pairs[1]) and 0 < pairs[2] < 1
    finally:
        scorer.close()
    with pytest.raises(UseripError, match="no model for backbone 'nope'"):
        CTRScorer(str(world.bank), world.ctr, backbone="nope")


def test_history_train_mode_uses_only_train_events(world):
    a = CTRScorer(str(world.bank), world.ctr, backbone="din", history="train")
    try:
        u = int(world.data.user_index(["10"])[0])
        inter = world.data.interactions
        train_items = set(inter[(inter["user_idx"] == u) & (inter["split"] == "train")]["item_idx"])
        hist = a.inputs(np.array([u]), np.zeros((1, 2), dtype=np.int64), np.array([1]))["history"][0].numpy()
        assert set(hist[hist > 0].tolist()) <= train_items
    finally:
        a.close()
    with pytest.raises(UseripError, match="history must be"):
        CTRScorer(str(world.bank), world.ctr, history="future")


def test_refuses_a_ctr_dir_of_a_newer_format_naming_it(world, tmp_path):
    ctr = tmp_path / "ctr"
    shutil.copytree(world.ctr, ctr)
    marker = json.loads((ctr / ".userip.json").read_text())
    assert marker["format_version"] == 1
    (ctr / ".userip.json").write_text(json.dumps({**marker, "format_version": 5}))
    with pytest.raises(UseripError, match="format_version 5"):
        CTRScorer(str(world.bank), ctr, data_dir=world.run / "data")


def test_refuses_models_without_profile_ids(world, tmp_path):
    ctr = tmp_path / "ctr"
    shutil.copytree(world.ctr, ctr)
    for f in (ctr / "models").glob("*.json"):
        cfg = json.loads(f.read_text())
        cfg["variant"] = "base"
        f.write_text(json.dumps(cfg))
    with pytest.raises(UseripError, match=r"no model was trained with the profile IDs"):
        CTRScorer(str(world.bank), ctr)


def test_refuses_a_bank_of_other_data_or_codebooks(world, tmp_path):
    _write_bank(tmp_path / "other.sqlite", "0" * 64)
    with pytest.raises(UseripError, match="fingerprint"):
        create_app(str(tmp_path / "other.sqlite"), world.ctr)
    _write_bank(tmp_path / "cb.sqlite", world.data.fingerprint, codebook_hash="another-codebook")
    with pytest.raises(UseripError, match="other codebooks"):
        create_app(str(tmp_path / "cb.sqlite"), world.ctr)


def test_bank_rebuild_is_picked_up_and_a_bad_one_gives_503(world, tmp_path, monkeypatch):
    import userip.serve.bank_reader as bank_reader

    bank = tmp_path / "live.sqlite"
    _write_bank(bank, world.data.fingerprint)
    monkeypatch.setattr(bank_reader, "BANK_CHECK_S", 0.0)
    with TestClient(create_app(str(bank), world.ctr, data_dir=world.run / "data")) as c:
        assert c.get("/v1/users/1/profile").json()["profiles"]["hobby"]["id"] == HOBBY["1"]
        new = dict(HOBBY, **{"1": 1 + HOBBY["1"] % 4})
        time.sleep(0.01)  # a new mtime, even on coarse filesystems the inode differs
        _write_bank(bank, world.data.fingerprint, hobby=new)
        assert c.get("/v1/users/1/profile").json()["profiles"]["hobby"]["id"] == new["1"]
        _write_bank(bank, world.data.fingerprint, codebook_hash="rebuilt-from-other-profiles")
        r = c.post("/v1/score", json={"user_id": "1", "item_ids": ["1"]})
        assert r.status_code == 503 and "other codebooks" in r.json()["message"]
        assert c.get("/healthz").status_code == 200


def test_explanations_absent_or_broken_are_tolerated(world, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(world.bank, other / "bank.sqlite")
    shutil.copytree(world.ctr, other / "ctr")
    with TestClient(create_app(str(other / "bank.sqlite"), other / "ctr", data_dir=world.run / "data")) as c:
        assert c.get("/v1/meta").json()["explanations"] is None
        hobby = c.get("/v1/users/1/profile").json()["profiles"]["hobby"]
        assert hobby["id"] == HOBBY["1"] and hobby["words"] == [] and hobby["phrase"] is None
    (other / "explanations.json").write_text("{not json")
    with TestClient(create_app(str(other / "bank.sqlite"), other / "ctr", data_dir=world.run / "data")) as c:
        assert c.get("/v1/users/1/profile").json()["profiles"]["hobby"]["words"] == []
    with pytest.raises(UseripError, match="explanations file not found"):
        create_app(str(world.bank), world.ctr, explanations=tmp_path / "missing.json")


def test_cli_serve_reports_bad_input_without_traceback(world, tmp_path):
    from userip.cli import app

    r = CliRunner().invoke(app, ["serve", "--bank", str(tmp_path / "missing.sqlite"), "--ctr", str(world.ctr)])
    out = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2 and "no feature bank here" in out and "Traceback" not in out


# ---------------------------------------------------------------------------------------------- real process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_userip_serve_process_answers_over_http(world, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "userip.cli", "serve", "--bank", str(world.bank), "--ctr", str(world.ctr),
           "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if _http("GET", f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy in 60 s"
            time.sleep(0.2)
        status, body = _http("GET", f"{base}/v1/users/3/profile")
        assert status == 200 and body["profiles"]["hobby"]["id"] == HOBBY["3"]
        status, body = _http("POST", f"{base}/v1/score", {"user_id": "3", "item_ids": ["1", "2", "zzz"]})
        assert status == 200 and [s["item_id"] for s in body["scores"]] == ["1", "2"]
        assert body["unknown_items"] == ["zzz"]
        status, body = _http("POST", f"{base}/v1/score", {"user_id": "3", "item_ids": []})
        assert status == 422
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode in (0, -signal.SIGINT), (tmp_path / "server.log").read_text()
