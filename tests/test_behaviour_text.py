"""Behaviour text modes: rated ("Title: 4"), years dropped, and the ceiling's recent history."""

import numpy as np

from userip.data import behaviour_windows, recent_history
from userip.data.text import SEP, strip_year
from userip.profile import ProfileConfig
from userip.profile.config import DEFAULT_TEMPLATE, RATED_TEMPLATE


def _expected(d, u, mode, title_year):
    inter = d.interactions
    rows = inter[(inter["user_idx"] == u) & (inter["split"] == "train")]
    titles = d.items.set_index("item_idx")["title"]
    out = []
    for item, rating in zip(rows["item_idx"], rows["rating"], strict=True):
        t = str(titles[item])
        t = strip_year(t) if title_year == "drop" else t
        out.append(f"{t}: {rating:g}" if mode == "rated" else t)
    return out


def test_rated_windows_hold_every_train_item_with_its_rating_in_time_order(prepared) -> None:
    d = prepared
    wins = behaviour_windows(d, "train", max_items=4, mode="rated", title_year="drop")
    for u in list(wins)[:5]:
        pieces = [p for w in wins[u] for p in w.split(SEP)]
        assert pieces == _expected(d, u, "rated", "drop")
        assert all(len(w.split(SEP)) <= 4 for w in wins[u])


def test_title_year_drop_removes_only_a_trailing_year() -> None:
    assert strip_year("Heat (1995)") == "Heat"
    assert strip_year("2001: A Space Odyssey (1968)") == "2001: A Space Odyssey"
    assert strip_year("Se7en") == "Se7en"
    assert strip_year("Frankenstein (1931) remake") == "Frankenstein (1931) remake"


def test_recent_history_is_the_last_n_train_items(prepared) -> None:
    d = prepared
    hist = recent_history(d, 3, mode="rated")
    for u in list(hist)[:5]:
        assert hist[u].split(SEP) == _expected(d, u, "rated", "keep")[-3:]
    assert set(hist) == set(behaviour_windows(d, "train"))


def test_binary_labels_render_as_0_1_when_there_is_no_rating(prepared) -> None:
    d = prepared
    d.interactions["rating"] = np.nan
    wins = behaviour_windows(d, "train", mode="rated")
    u = next(iter(wins))
    labels = d.interactions[(d.interactions["user_idx"] == u) & (d.interactions["split"] == "train")]["label"]
    assert [p.rsplit(": ", 1)[1] for w in wins[u] for p in w.split(SEP)] == [str(int(x)) for x in labels]


def test_rated_behaviour_gets_a_template_that_says_what_the_number_is() -> None:
    assert ProfileConfig(behaviour="rated").template == RATED_TEMPLATE
    assert ProfileConfig().template == DEFAULT_TEMPLATE
    assert "rated" in RATED_TEMPLATE


def test_replacing_the_behaviour_keeps_the_default_template_in_step() -> None:
    assert ProfileConfig().replace(behaviour="rated").template == RATED_TEMPLATE
    assert ProfileConfig(behaviour="rated").replace(behaviour="sequence").template == DEFAULT_TEMPLATE
    own = "{hobby} {background} watched: {behaviour}"
    assert ProfileConfig(template=own).replace(behaviour="rated").template == own  # a user's template stays
