"""Synthetic CTR example sets for the CTR tests (no userip.data / userip.bank needed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def make_examples(n_users=200, n_items=100, rows_per_user=20, *, planted=False, seed=0, hist_len=5,
                  rating_bias=0.0):
    """(train, val, test) SimpleNamespaces with the CTRExamples fields, the hidden group per user, activity.

    ``planted``: a hidden user group (1..4) decides the label (P=0.85 when the item's category matches the
    group, else 0.2) and the history is random, so without the group nothing predicts the label;
    ``rating_bias`` adds ``rating_bias * b_u`` (b_u ~ N(0, 1), a user's rating level) to the logit, a signal
    that the user's train label rate carries and the group does not.
    Otherwise the label follows item and user biases and the history holds the user's earlier clicks.
    """
    rng = np.random.default_rng(seed)
    group = np.r_[0, rng.integers(1, 5, n_users)]
    cat = np.r_[0, np.arange(n_items) % 4 + 1]
    item_bias = np.r_[0, rng.normal(0, 1.2, n_items)]
    user_bias = np.r_[0, rng.normal(0, 0.7, n_users)]
    counts = np.clip((rng.pareto(1.5, n_users) * rows_per_user / 2).astype(int) + 4, 3, rows_per_user * 5)
    users, items, labels, hist = [], [], [], []
    for u in range(1, n_users + 1):
        clicked: list[int] = []
        for i in rng.integers(1, n_items + 1, counts[u - 1]):
            h = np.zeros(hist_len, dtype=np.int64)
            if planted:
                logit = (1.735 if cat[i] == group[u] else -1.386) + rating_bias * user_bias[u] / 0.7
                p = 1 / (1 + np.exp(-logit))
                h[:] = rng.integers(1, n_items + 1, hist_len)
            else:
                p = 1 / (1 + np.exp(-(1.5 * item_bias[i] + user_bias[u])))
                if clicked:
                    last = clicked[-hist_len:]
                    h[-len(last) :] = last
            y = float(rng.random() < p)
            if y:
                clicked.append(int(i))
            users.append(u)
            items.append(i)
            labels.append(y)
            hist.append(h)
    users, items = np.array(users, dtype=np.int64), np.array(items, dtype=np.int64)
    genres = np.stack([cat[items], np.where(items % 3 == 0, 5, 0)], axis=1)
    gender = np.r_[0, rng.integers(1, 3, n_users)]
    split = rng.choice(3, len(users), p=[0.7, 0.15, 0.15])
    vocab = {"user": n_users + 1, "item": n_items + 1, "genre": 6, "gender": 3}
    hist, labels = np.array(hist), np.array(labels, dtype=np.float32)
    out = []
    for s in range(3):
        m = split == s
        out.append(
            SimpleNamespace(
                user=users[m], item=items[m], genres=genres[m], history=hist[m],
                side={"gender": gender[users[m]]}, label=labels[m], timestamp=np.flatnonzero(m),
                vocab=dict(vocab),
            )
        )
    activity = np.bincount(out[0].user, minlength=n_users + 1)
    return tuple(out), group, activity
