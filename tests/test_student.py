"""The distilled new-user encoder (profile.student): item states, the cross-fitted ridge, infer and distil."""

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from test_amortised import cfg, planted
from userip.errors import UseripError
from userip.llm import tiny_llm
from userip.profile import ProfileConfig, distil_profiles, fit_profiles, has_student, infer_profiles
from userip.profile.pooled import pool_windows, window_items
from userip.profile.student import HistoryStudent, ItemStates, fit_student, item_features

pytestmark = pytest.mark.usefixtures("data_cache")  # every cache of these tests lives in tmp_path


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(seed=0)


def test_item_states_are_each_interaction_read_alone_and_read_once(llm, tmp_path, monkeypatch):
    corpus = planted(llm.tokenizer, n_users=6)
    windows = {u: corpus.train[u] for u in (1, 2, 3)}
    path = tmp_path / "items.safetensors"
    feats = item_features(llm, windows, ItemStates(llm, cache=path))
    # by hand: every item of a window read alone, the window the mean of its items, the user the mean of windows
    for u, ws in windows.items():
        per_window = [pool_windows(llm, window_items(llm.tokenizer, w)).mean(0) for w in ws]
        torch.testing.assert_close(feats[u], torch.stack(per_window).mean(0), atol=1e-4, rtol=1e-4)
    assert path.exists()
    import userip.profile.student as student

    def boom(*a, **k):
        raise AssertionError("a cached interaction was read by the LLM again")

    monkeypatch.setattr(student, "pool_windows", boom)
    again = item_features(llm, windows, ItemStates(llm, cache=path))  # a fresh instance: read from disk
    for u in windows:
        torch.testing.assert_close(again[u], feats[u])
    with pytest.raises(AssertionError, match="read by the LLM"):  # a new interaction is read
        item_features(llm, {9: [llm.tokenizer.encode("Fargo: 3", add_special_tokens=False)]},
                      ItemStates(llm, cache=path))


def test_each_student_fits_only_the_users_outside_its_fold():
    g = torch.Generator().manual_seed(0)
    n, h, d = 200, 12, 6
    x = torch.randn(n, h, generator=g)
    z = x @ torch.randn(h, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)
    latents = [torch.randn(3, d, generator=g)]
    groups = torch.arange(n) % 2
    s, oof, m = fit_student(x, z, latents, groups, alphas=(0.1, 1000.0))
    assert m["alpha"] == 0.1 and m["students"] == 2  # a near-linear target wants little shrinkage
    assert min(m["held_out_latent_r2"]) > 0.9
    torch.testing.assert_close(s.predict(x, groups), oof, atol=1e-4, rtol=1e-4)  # oof = the user's own fold's
    torch.testing.assert_close(s.predict(x), (s.predict(x, torch.zeros(n, dtype=torch.long))
                                              + s.predict(x, torch.ones(n, dtype=torch.long))) / 2)
    z2 = z.clone()
    z2[groups == 0] += torch.randn(int((groups == 0).sum()), d, generator=g)
    s2, _, _ = fit_student(x, z2, latents, groups, alphas=(0.1,))
    torch.testing.assert_close(s2.coef[0], s.coef[0])  # student 0 never saw fold 0's targets
    assert not torch.allclose(s2.coef[1], s.coef[1])
    back = HistoryStudent.from_tensors(s.to_tensors())
    torch.testing.assert_close(back.predict(x, groups), s.predict(x, groups))
    assert HistoryStudent.from_tensors({}) is None
    with pytest.raises(UseripError, match="cross-fitting fold"):
        fit_student(x, z, latents, torch.zeros(n, dtype=torch.long) + 1)


def test_distilling_moves_no_fitted_id_and_the_student_reads_users_close_to_the_encoder(llm, tmp_path):
    from test_amortised import _fit_and_reload

    users = list(range(1, 25))
    conf = cfg(cross_fit=2, epochs=3)
    fit, inf, rows = _fit_and_reload(llm, tmp_path, conf, users)
    fitted = fit.assignments()[users].clone()
    table = fit.profiles.table.clone()
    m = fit.fit_student()
    assert set(m["oof_id_agreement"]) == {"hobby", "background"} and m["users"] == 24
    assert torch.equal(fit.assignments()[users], fitted)  # distilling moves no fitted ID
    torch.testing.assert_close(fit.profiles.table, table)  # nor any fitted personal part
    assert fit.student is not None and inf.student is None
    with pytest.raises(UseripError, match="no student"):
        inf.infer(torch.tensor(rows), encoder="student")
    inf.student = fit.student
    z = inf.infer(torch.tensor(rows), fitted_rows=torch.tensor(users), encoder="student")
    # the planted groups are read off single items: what the maps read of the student's z is closer to the
    # user's own encoder input than to their neighbour's (the other group), and most fitted IDs come back
    pred = fit.student.predict(inf.item_features(rows), fit.fold[users])
    teacher = fit.features(users)
    B = torch.cat([b.detach() for m in fit.maps for b in m.B])
    own = ((pred - teacher) @ B.T).norm(dim=1).mean()
    other = ((pred - teacher[[i ^ 1 for i in range(len(users))]]) @ B.T).norm(dim=1).mean()
    assert float(own) < 0.8 * float(other), (own, other)
    assert float((z == fitted).float().mean()) >= 0.6
    assert torch.equal(inf.infer(torch.tensor(rows), fitted_rows=torch.tensor(users), encoder="llm"), fitted)


def test_fit_with_a_student_and_distil_into_an_old_fit(prepared, tmp_path, monkeypatch):
    fast = dict(epochs=2, batch_users=4, max_tokens=32, inference="amortised", cross_fit=2, rank=4,
                eval_users=8, bootstrap=50)
    llm = tiny_llm()
    metrics = fit_profiles(prepared.path, tmp_path / "s", llm=llm, progress=False, student="item", **fast)
    assert has_student(tmp_path / "s")
    from rich.console import Console

    from userip.profile.report import summary_table

    con = Console(record=True, width=200)
    con.print(summary_table(metrics))
    assert "new-user student (ridge alpha" in con.export_text()
    t = load_file(tmp_path / "s" / "profiles.safetensors")
    assert t["student.coef"].shape[:2] == (2, 32)
    fit_profiles(prepared.path, tmp_path / "p", llm=llm, progress=False, **fast)
    assert not has_student(tmp_path / "p")
    before = pd.read_parquet(tmp_path / "p" / "profile_ids.parquet")
    m = distil_profiles(tmp_path / "p", prepared.path, llm=llm, progress=False)
    assert has_student(tmp_path / "p") and 0 <= m["oof_id_agreement"]["hobby"]["agreement"] <= 1
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "p" / "profile_ids.parquet"), before)
    # a student fit and a distilled one are the same student (same fit, same seed)
    t2 = load_file(tmp_path / "p" / "profiles.safetensors")
    torch.testing.assert_close(t2["student.coef"], t["student.coef"])
    # profile infer with the student never pools a history window
    import userip.profile.pooled as pooled

    def boom(*a, **k):
        raise AssertionError("pooled a window")

    monkeypatch.setattr(pooled.PooledStates, "get", boom)
    users = before["user_id"].astype(str).tolist()[:5]
    out = infer_profiles(tmp_path / "p", prepared.path, users, llm=llm, progress=False)
    assert list(out.columns) == ["user_id", "hobby", "background"] and out["hobby"].between(1, 4).all()
    with pytest.raises(AssertionError, match="pooled a window"):
        infer_profiles(tmp_path / "p", prepared.path, users, llm=llm, progress=False, encoder="llm")
    with pytest.raises(UseripError, match="encoder 'x'"):
        infer_profiles(tmp_path / "p", prepared.path, users, llm=llm, progress=False, encoder="x")


def test_a_student_needs_the_amortised_encoder(prepared, tmp_path):
    with pytest.raises(UseripError, match="config.student"):
        ProfileConfig(profiles=[{"name": "hobby", "codebook_size": 2}], inference="em", student="item")
    with pytest.raises(UseripError, match="config.student: 'big'"):
        ProfileConfig(profiles=[{"name": "hobby", "codebook_size": 2}], inference="amortised", student="big")
    fit_profiles(prepared.path, tmp_path / "em", llm=tiny_llm(), progress=False, epochs=1, batch_users=4,
                 inner_steps=1, max_tokens=32, windows_per_user=1)
    with pytest.raises(UseripError, match="a student distils an amortised fit"):
        distil_profiles(tmp_path / "em", prepared.path, llm=tiny_llm(), progress=False)
