"""Explanations of profile codes: nearest vocabulary tokens, a phrase decoded by the frozen LM, and the genres
and titles over-represented among the users holding the code.

The tokens and the phrase read the code's soft-token vector (``base + mu + s * c``) through the LM, so they
say what the *LM* makes of it; the lifts say what the users holding it actually watched. Only the second is
evidence about users; the first two are a look at the embedding space and often read as noise for a 135M LM.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from userip.errors import UseripError
from userip.explain.codes import ProfileCodes, load_profile_codes
from userip.io import write_json
from userip.profile.model import SoftPrompt
from userip.profile.template import parse_template

log = logging.getLogger(__name__)

DEFAULT_SUFFIX = "In short, this user likes"
_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BPE_SPACE = ("Ġ", "▁")


# ---------------------------------------------------------------------------------------------- lift
def lift(group_counts: Mapping | pd.Series, group_total: int, all_counts: Mapping | pd.Series, all_total: int,
         min_count: int = 1) -> pd.DataFrame:
    """Over-representation of keys (genres, titles) in a group versus everyone.

    ``share = group_counts[key] / group_total``, ``base_share = all_counts[key] / all_total``,
    ``lift = share / base_share``. Keys with ``group_counts < min_count`` are dropped (support). Sorted by
    lift, then count, descending; index is the key. The counts may be interactions or users, as long as
    group and population count the same unit.
    """
    g = pd.Series(group_counts, dtype="float64")
    a = pd.Series(all_counts, dtype="float64")
    cols = ["count", "share", "base_share", "lift"]
    if group_total <= 0 or all_total <= 0 or g.empty:
        return pd.DataFrame(columns=cols, dtype="float64")
    g = g[g >= min_count]
    base = a.reindex(g.index).fillna(0.0)
    if (base < g).any():
        bad = list(g.index[base < g])[:3]
        raise ValueError(f"group counts exceed the population counts for {bad}")
    df = pd.DataFrame({"count": g, "share": g / group_total, "base_share": base / all_total})
    df["lift"] = df["share"] / df["base_share"]
    return df.sort_values(["lift", "count"], ascending=False, kind="mergesort")


def code_lifts(data, ids: pd.DataFrame, profile: str, *, top: int = 5, min_users: int = 5,
               min_interactions: int = 20) -> dict[int, dict[str, Any]]:
    """Per code of ``profile``: users, and the most over-represented genres and titles on train interactions.

    Genres count interactions (every genre of a watched item counts once per interaction; support
    ``>= min_interactions`` in the code's group). Titles count distinct users (support ``>= min_users`` of
    the code's users). The population is every fitted user (the rows of ``ids``).
    """
    inter = data.interactions
    inter = inter[(inter["split"] == "train") & inter["user_idx"].isin(ids["user_idx"])]
    code_of = ids.set_index("user_idx")[profile]
    inter = inter.assign(code=inter["user_idx"].map(code_of).to_numpy())
    items = data.items.set_index("item_idx")
    titles = items["title"].astype(str)
    genres = inter[["code", "item_idx"]].join(items["genres"], on="item_idx").explode("genres")
    genres = genres[genres["genres"].notna()]
    all_genres = genres["genres"].value_counts()
    all_titles = inter.drop_duplicates(["user_idx", "item_idx"])["item_idx"].value_counts()
    n_all_users, n_all_inter = len(ids), len(inter)
    out: dict[int, dict[str, Any]] = {}
    for code, n_users in ids[profile].value_counts().sort_index().items():
        mine = inter[inter["code"] == code]
        g = lift(genres.loc[genres["code"] == code, "genres"].value_counts(), len(mine), all_genres,
                 n_all_inter, min_count=min_interactions)
        t = lift(mine.drop_duplicates(["user_idx", "item_idx"])["item_idx"].value_counts(), int(n_users),
                 all_titles, n_all_users, min_count=min_users)
        g, t = g[g["lift"] > 1].head(top), t[t["lift"] > 1].head(top)
        out[int(code)] = {
            "users": int(n_users),
            "interactions": len(mine),
            "genres": [{"genre": str(k), **_stats(r), "interactions": int(r["count"])} for k, r in g.iterrows()],
            "titles": [{"title": str(titles.get(k, k)), **_stats(r), "users": int(r["count"])}
                       for k, r in t.iterrows()],
        }
    return out


def _stats(r: pd.Series) -> dict[str, float]:
    return {"lift": float(r["lift"]), "share": float(r["share"]), "base_share": float(r["base_share"])}


# ---------------------------------------------------------------------------------------------- tokens
def word_like(token: str) -> str | None:
    """The token without its BPE space marker if it is a word (ASCII letters only, length >= 3), else None."""
    s = token
    for m in _BPE_SPACE:
        if s.startswith(m):
            s = s[len(m):]
    return s if len(s) >= 3 and s.isascii() and s.isalpha() else None


class TokenIndex:
    """Word-like vocabulary tokens and their unit-norm input embeddings, for cosine nearest neighbours.

    Word-start tokens (those carrying the BPE space marker) are preferred: a continuation piece such as
    "irst" passes the word-like filter but is not a word. Only a vocabulary with fewer than ``min_words``
    word-start tokens falls back to every word-like token.
    """

    def __init__(self, llm, min_words: int = 50) -> None:
        tok = llm.tokenizer
        emb = llm.input_embeddings().weight.detach().float().cpu()
        pieces = tok.convert_ids_to_tokens(list(range(emb.shape[0])))
        start = [i for i, p in enumerate(pieces) if isinstance(p, str) and p.startswith(_BPE_SPACE)]
        start = [i for i in start if word_like(pieces[i])]
        pool = start if len(start) >= min_words else range(len(pieces))
        words: list[str] = []
        rows: list[int] = []
        seen: set[str] = set()
        for i in pool:
            w = word_like(pieces[i]) if isinstance(pieces[i], str) else None
            if w is None or w.lower() in seen:  # " Hobby" and " hobby" read the same: keep the first id
                continue
            seen.add(w.lower())
            words.append(w)
            rows.append(i)
        if not rows:
            raise UseripError(f"{llm.name}: no word-like tokens in the vocabulary")
        self.words = words
        self.ids = torch.tensor(rows)
        self.unit = torch.nn.functional.normalize(emb[self.ids], dim=1)

    def nearest(self, vectors: torch.Tensor, top_k: int) -> list[list[str]]:
        """Top-k word tokens by cosine for each row of ``vectors`` [N, H]."""
        v = torch.nn.functional.normalize(vectors.float().cpu(), dim=1)
        sims = v @ self.unit.T
        idx = sims.topk(min(top_k, sims.shape[1]), dim=1).indices
        return [[self.words[j] for j in row] for row in idx.tolist()]

    def nearest_multi(self, vectors: torch.Tensor, top_k: int) -> list[str]:
        """Top-k over several soft tokens [n, H]: each word scored by its best cosine to any of them."""
        v = torch.nn.functional.normalize(vectors.float().cpu(), dim=1)
        sims = (v @ self.unit.T).max(0).values
        return [self.words[j] for j in sims.topk(min(top_k, sims.numel())).indices.tolist()]


# ---------------------------------------------------------------------------------------------- phrases
def generation_template(template: str, names: list[str], suffix: str = DEFAULT_SUFFIX) -> str:
    """The profile template with its tail (text after the last profile slot, e.g. "The user watched:")
    replaced by ``suffix``; punctuation right after the last slot is kept. Still ends with {behaviour},
    so `SoftPrompt` lays it out exactly like the training prompt."""
    texts, _ = parse_template(template, names)
    slots = [m for m in _SLOT.finditer(template) if m.group(1) != "behaviour"]
    if not slots:
        raise UseripError("config.template: no profile slot")
    end = slots[-1].end()
    keep = re.match(r"[^\w\s{]*", texts[-1]).group(0)
    return template[:end] + keep + " " + suffix.strip() + " {behaviour}"


def phrase_prompt(template: str, names: list[str], suffix: str = DEFAULT_SUFFIX) -> str:
    """Human-readable generation prompt, soft-token slots shown as <name>."""
    t = generation_template(template, names, suffix)
    return t.replace("{behaviour}", "").rstrip().format(**{n: f"<{n}>" for n in names})


class PhraseDecoder:
    """Greedy decoding from the profile prompt with given soft tokens in the slots."""

    def __init__(self, llm, cfg, suffix: str = DEFAULT_SUFFIX) -> None:
        self.llm, self.cfg = llm, cfg
        self.template = generation_template(cfg.template, cfg.names, suffix)
        self.prompt = SoftPrompt(llm, cfg, self.template)  # laid out exactly like the training prompt
        self.layout = self.prompt.layout

    def embed(self, theta: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [B, P, H] of the prompt with ``theta`` [B, m, n, H] in the soft-token slots
        (the training prompt's assembly, without behaviour tokens)."""
        return self.prompt(theta)

    @torch.no_grad()
    def decode(self, theta: torch.Tensor, max_new_tokens: int = 12) -> list[str]:
        """One greedy continuation per row of ``theta`` (``model.generate`` from ``inputs_embeds``).

        Plain causal attention: the profile-aware block mask is a training device (it makes each soft token
        be read next to its own name only); generation reads the prompt left to right like any text. All rows
        share the prompt layout, so there is no padding and no attention mask beyond causal. A row that has
        ended is filled with EOS, which decoding drops.
        """
        from transformers import GenerationConfig

        model, tok = self.llm.model, self.llm.tokenizer
        if max_new_tokens < 1:
            return [""] * theta.shape[0]
        x = self.embed(theta)
        eos = tok.eos_token_id
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                               pad_token_id=eos)
        ids = model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long,
                                                                          device=x.device), generation_config=gen)
        return [_clean(tok.decode(row, skip_special_tokens=True)) for row in ids.cpu().tolist()]


def _clean(text: str) -> str:
    """First line, without undecodable bytes or control characters (a byte-level BPE can stop mid-glyph)."""
    line = text.split("\n")[0]
    return "".join(ch for ch in line if ch.isprintable() and ch != "\ufffd").strip()


# ---------------------------------------------------------------------------------------------- explain
def explain(profiles_dir: str | Path, data_dir: str | Path | None = None, llm=None, top_k: int = 10, *,
            suffix: str = DEFAULT_SUFFIX, max_new_tokens: int = 12, top_lifts: int = 5, min_users: int = 5,
            min_interactions: int = 20, out: str | Path | None = None, write: bool = True) -> dict[str, Any]:
    """Explain every code of every profile; write ``explanations.json`` (``out``, default next to the
    profiles) unless ``write=False``, and return the same dict.

    ``data_dir`` defaults to the ``data_dir`` recorded in the PROFILES ``config.yaml``; ``llm`` to the model
    recorded there (loaded on CPU).
    """
    from userip.data import load_prepared

    pc = load_profile_codes(profiles_dir)
    data = load_prepared(_data_dir(pc, data_dir))
    fp = pc.conf.get("data_fingerprint")
    if fp and fp != data.fingerprint:
        from userip.data.fingerprint import fingerprint_mismatch

        raise UseripError(f"{data.path}: " + fingerprint_mismatch(f"profiles {profiles_dir}", fp, data.fingerprint))
    if llm is None:
        from userip.llm import load_llm

        llm = load_llm(pc.conf.get("model") or "smollm2-135m")
    if llm.hidden_size != pc.hidden:
        raise UseripError(f"LLM {llm.name} has hidden size {llm.hidden_size}, profiles have {pc.hidden}")
    index = TokenIndex(llm)
    decoder = PhraseDecoder(llm, pc.cfg, suffix)
    pop = pc.population  # [m, n, H]
    result: dict[str, Any] = {
        "profiles_dir": str(pc.root),
        "data_dir": str(data.path),
        "model": llm.name,
        "n_users": len(pc.ids),
        "top_k": top_k,
        "prompt": phrase_prompt(pc.cfg.template, pc.names, suffix),
        "min_support": {"title_users": min_users, "genre_interactions": min_interactions},
        "profiles": {},
    }
    population_phrase = decoder.decode(pop[None], max_new_tokens)[0]
    for k, p in enumerate(pc.cfg.profiles):
        vecs = pc.code_vectors[p.name]  # [K, n_k, H]
        K = vecs.shape[0]
        theta = pop[None].repeat(K, 1, 1, 1)
        theta[:, k, : p.n_tokens] = vecs
        phrases = decoder.decode(theta, max_new_tokens)
        offsets = vecs - pop[k, : p.n_tokens][None]  # s * c: the code's direction away from the population
        lifts = code_lifts(data, pc.ids, p.name, top=top_lifts, min_users=min_users,
                           min_interactions=min_interactions)
        codes = []
        for c in range(K):
            entry: dict[str, Any] = {"code": c + 1}
            stats = lifts.get(c + 1, {"users": 0, "interactions": 0, "genres": [], "titles": []})
            entry["users"] = stats["users"]
            entry["interactions"] = stats["interactions"]
            entry["tokens"] = index.nearest_multi(vecs[c], top_k)
            entry["offset_tokens"] = index.nearest_multi(offsets[c], top_k)
            if p.n_tokens > 1:
                entry["tokens_per_slot"] = index.nearest(vecs[c], top_k)
            entry["phrase"] = phrases[c]
            entry["genres"] = stats["genres"]
            entry["titles"] = stats["titles"]
            codes.append(entry)
        result["profiles"][p.name] = {
            "n_tokens": p.n_tokens,
            "codebook_size": K,
            "population_tokens": index.nearest_multi(pop[k, : p.n_tokens], top_k),
            "population_phrase": population_phrase,
            "codes": codes,
        }
    if write:
        path = Path(out) if out is not None else pc.root / "explanations.json"
        if path.is_dir():
            path = path / "explanations.json"
        write_json(path, result)
        log.info("wrote %s", path)
    return result


def _data_dir(pc: ProfileCodes, data_dir: str | Path | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    recorded = pc.conf.get("data_dir") or ""
    if not recorded or not Path(recorded).exists():
        where = f" ({recorded} does not exist)" if recorded else ""
        raise UseripError(f"{pc.root}/config.yaml records no usable data_dir{where}: pass the data directory "
                          "(--data)")
    return Path(recorded)


# ---------------------------------------------------------------------------------------------- markdown
def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def explanations_markdown(expl: dict[str, Any], *, max_tokens: int = 6, max_items: int = 3) -> str:
    """A readable markdown section: per profile, one table row per code."""
    lines = ["## Profile explanations", ""]
    lines.append(f"{expl.get('n_users', '?')} fitted users; model `{expl.get('model', '?')}`; "
                 f"phrase prompt: `{expl.get('prompt', '')}`")
    sup = expl.get("min_support", {})
    if sup:
        lines.append(f"Lift = share among the code's users / share among all fitted users (train interactions); "
                     f"genres need >= {sup.get('genre_interactions')} interactions, titles >= "
                     f"{sup.get('title_users')} users.")
    lines.append("")
    for name, prof in expl["profiles"].items():
        lines.append(f"### {name} (K={prof['codebook_size']}, {prof['n_tokens']} token(s))")
        lines.append("")
        lines.append(f"Population value: tokens {', '.join(prof['population_tokens'][:max_tokens])}; "
                     f"phrase \"{_md(prof['population_phrase'])}\"")
        lines.append("")
        lines.append("| code | users | nearest tokens | offset tokens | phrase | genres (lift) | titles (lift) |")
        lines.append("|---:|---:|---|---|---|---|---|")
        for c in prof["codes"]:
            genres = ", ".join(f"{g['genre']} ({g['lift']:.2f})" for g in c["genres"][:max_items]) or "-"
            titles = ", ".join(f"{t['title']} ({t['lift']:.2f})" for t in c["titles"][:max_items]) or "-"
            lines.append("| " + " | ".join([
                str(c["code"]), str(c["users"]), _md(", ".join(c["tokens"][:max_tokens])),
                _md(", ".join(c["offset_tokens"][:max_tokens])), _md(c["phrase"]) or "-", _md(genres), _md(titles),
            ]) + " |")
        lines.append("")
    return "\n".join(lines)
