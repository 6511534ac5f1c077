"""Variant names and what each one is compared with: the algebra the table and the harness share.

A variant is ``base`` or ``+part[+part...]``, one part per user-feature source it adds:

- learned sources (``ids``, ``theta``, and every baseline such as ``hist-ids`` or ``text-dense``) and their
  **permuted twins** (``ids-permuted``: the same rows permuted jointly across users by a seeded permutation
  that never sees labels, so the same distribution, the same field and the same capacity, with no link to
  the user's behaviour);
- controls (``activity``, ``label-rate``): cheap user summaries a learned source must beat; a control has no twin.

So ``+ids+label-rate`` adds the IDs and the label-rate bucket. Every variant with a learned part (a *source*)
has its twin (every learned part permuted) and its *reference*: the variant without its learned parts
(``base``, or ``+label-rate`` for ``+ids+label-rate``: does it add anything on top?).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from userip.errors import UseripError

BASE = "base"
PERMUTED = "-permuted"
CONTROL_PARTS = ("activity", "label-rate")
CONTROLS = (BASE, "+activity", "+label-rate")  # what every source must beat, besides its own twin
# the competitor shown in the default table: the first of these that was built. The LLM's pooled history state
# first: in the full ML-100K table (943 users, 5 backbones, 5 seeds) it is the only source that beats every
# control on 4 of 5 backbones without user_id (+0.011..+0.017 AUC over its permuted twin)
COMPETITORS = ("+hist-dense", "+hist-ids", "+content-ids", "+text-ids", "+text-dense")
VARIANT_LISTS = ("default", "all")  # named lists; any "+part" combination of built sources also works
_PART = re.compile(r"[a-z0-9][a-z0-9_-]*")


def parts(variant: str) -> tuple[str, ...]:
    """``"+ids+label-rate"`` -> ``("ids", "label-rate")``; ``base`` -> ``()``."""
    if variant == BASE:
        return ()
    if not isinstance(variant, str) or not variant.startswith("+"):
        raise UseripError(f"variant '{variant}': expected 'base' or '+source[+source...]' (e.g. '+ids')")
    out = tuple(variant[1:].split("+"))
    if any(not _PART.fullmatch(p) for p in out) or len(set(out)) != len(out):
        raise UseripError(f"variant '{variant}': each '+part' must be a distinct name of [a-z0-9_-]")
    return out


def join(ps: Iterable[str]) -> str:
    ps = list(ps)
    return "+" + "+".join(ps) if ps else BASE


def is_permuted(part: str) -> bool:
    return part.endswith(PERMUTED)


def source_of(part: str) -> str:
    """The source a part reads: ``ids`` for ``ids`` and for its twin ``ids-permuted``."""
    return part.removesuffix(PERMUTED)


def learned_parts(variant: str) -> list[str]:
    return [p for p in parts(variant) if p not in CONTROL_PARTS and not is_permuted(p)]


def role(variant: str) -> str:
    """``base``, ``control`` (only control parts), ``twin`` (a permuted part) or ``source``."""
    ps = parts(variant)
    if not ps:
        return "base"
    if any(is_permuted(p) for p in ps):
        return "twin"
    return "source" if learned_parts(variant) else "control"


def twin(variant: str) -> str | None:
    """The permuted twin of a source (every learned part permuted); None for base, controls and twins."""
    if role(variant) != "source":
        return None
    return join(p if p in CONTROL_PARTS else p + PERMUTED for p in parts(variant))


def reference(variant: str) -> str:
    """What a source adds to: the variant without its learned parts (``base`` or a control)."""
    return join(p for p in parts(variant) if p in CONTROL_PARTS)


def controls_for(variant: str, available: Iterable[str]) -> list[str]:
    """What ``variant`` is compared with, among the variants that were run. A source: every control it must
    beat (its reference, base, +activity, +label-rate, its twin); a twin or a control: its reference only
    (a twin should show no lift over it; a control's lift over base is the bar a source has to clear)."""
    have = set(available)
    r = role(variant)
    want = [reference(variant), *CONTROLS, twin(variant)] if r == "source" else [reference(variant), BASE]
    out = [c for c in dict.fromkeys(want) if c is not None and c != variant and c in have]
    return out[:1] if r != "source" else out


def variant_lists(sources: Sequence[str], competitor: str | None = None) -> dict[str, list[str]]:
    """The ``default`` (headline) and ``all`` variant lists for the learned ``sources`` that were built
    (``+ids``, ``+theta``, baselines...). ``competitor``: the baseline shown in the default table (default:
    the first of :data:`COMPETITORS` available)."""
    sources = list(dict.fromkeys(sources))
    extras = [s for s in sources if s != "+ids"]
    if competitor is None:
        competitor = next((c for c in COMPETITORS if c in extras), None)
    elif competitor not in extras:
        raise UseripError(f"competitor '{competitor}' is not a built source; built: {', '.join(extras) or 'none'}")
    head = [BASE, "+ids", "+ids" + PERMUTED, "+activity", "+label-rate", "+ids+label-rate"]
    default = head + ([competitor, competitor + PERMUTED] if competitor else [])
    everything = [*head, "+ids-permuted+label-rate"]
    for s in extras:
        everything += [s, s + PERMUTED]
    return {"default": default, "all": everything}


def as_list(x, what: str, allowed: Sequence[str] | None = None) -> list[str]:
    """A comma string or a list of names, stripped and deduplicated; empty or (with ``allowed``) unknown is an
    error naming ``what``."""
    items = [s.strip() for s in x.split(",")] if isinstance(x, str) else list(x)
    items = [s for s in items if s]
    if not items:
        raise UseripError(f"no {what} given")
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise UseripError(f"unknown {what} {bad}; known: {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def resolve(variants, sources: Iterable[str], competitor: str | None = None) -> list[str]:
    """``default`` / ``all`` / a list (comma string) of variants, each checked against the built ``sources``
    (their part names: ``ids``, ``activity``, ``label-rate``, ``theta``, ``hist-ids``, ...)."""
    sources = list(sources)
    lists = variant_lists(["+" + n for n in sources if n not in CONTROL_PARTS], competitor)
    chosen = variants if variants is not None else "default"
    if isinstance(chosen, str) and chosen.strip() in lists:
        chosen = lists[chosen.strip()]
    out = []
    for v in as_list(chosen, "variants"):
        if v in lists:
            out += lists[v]
            continue
        try:
            ps = parts(v)
        except UseripError as e:
            raise UseripError(f"unknown variants ['{v}']: {e}") from None
        for p in ps:
            base = source_of(p)
            if base not in sources or (is_permuted(p) and base in CONTROL_PARTS):
                known = ", ".join(["default", "all", *lists["all"]])
                hint = (f"variant '{v}' needs theta (the personal soft tokens, e.g. from --profiles)"
                        if base == "theta" else f"unknown variants ['{v}']")
                raise UseripError(f"{hint}; known: {known}")
        out.append(v)
    return list(dict.fromkeys(out))
