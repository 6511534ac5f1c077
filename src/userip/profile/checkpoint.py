"""Per-epoch checkpoints of a fit, and resuming from them (a killed fit continues and ends with the same IDs).

Each rank writes its shard of the epoch (``epochNNNN.rankR-of-W.safetensors``: the fit's state, the best
epoch's snapshot and the inference mode's optimiser state); then rank 0 commits the epoch by rewriting
``last.json``. A checkpoint is resumed only when its config (less epochs/patience/threads; settings added to
userip after it was written count as their defaults) and process count match; otherwise the fit starts afresh
and says so.
"""

from __future__ import annotations

import logging
from typing import Any

from safetensors.torch import load_file, save_file

from userip.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

# may change between a run and its continuation
RESUMABLE_CHANGES = ("epochs", "patience", "threads")


def comparable_config(cfg: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as a dict to compare with a checkpoint's ``saved`` config: a key the checkpoint predates (a
    setting added to userip since) is left out when it holds its default, which is what the old fit ran with."""
    import dataclasses

    now = cfg.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    for key in set(now) - set(saved):
        if key in defaults and now[key] == defaults[key]:
            now.pop(key)
    return now


def shard_name(fitter: Any, epoch: int) -> str:
    return f"epoch{epoch:04d}.rank{fitter.dist.rank}-of-{fitter.dist.world}.safetensors"


def save_checkpoint(fitter: Any) -> None:
    """Each rank writes its shard for this epoch; then rank 0 commits by pointing last.json at the epoch."""
    if fitter.out_dir is None:
        return
    ck = fitter.out_dir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    st = fitter.state
    tensors = fitter._snapshot()
    tensors.update({f"best.{k}": v for k, v in fitter.best.items()})
    tensors.update(fitter.extra_checkpoint())
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(ck / shard_name(fitter, st.epoch)) as tmp:
        save_file(tensors, str(tmp))
    fitter.dist.barrier()  # every shard of this epoch is on disk before the commit
    if fitter.dist.is_main:
        write_json(ck / "last.json", {
            "epoch": st.epoch, "world": fitter.dist.world, "metrics": st.metrics, "best_epoch": st.best_epoch,
            "best_nll": st.best_nll, "bad_epochs": st.bad_epochs, "config": fitter.cfg.to_dict(),
        })
    fitter.dist.barrier()
    for old in ck.glob(f"epoch*.rank{fitter.dist.rank}-of-{fitter.dist.world}.safetensors"):
        if old.name != shard_name(fitter, st.epoch):
            old.unlink(missing_ok=True)


def resume(fitter: Any) -> bool:
    """Load the last committed epoch into ``fitter`` when it matches; returns whether it resumed."""
    if fitter.out_dir is None:
        return False
    ck = fitter.out_dir / "checkpoints"
    if not (ck / "last.json").exists():
        return False
    meta = read_json(ck / "last.json")
    saved = dict(meta["config"])
    now = comparable_config(fitter.cfg, saved)
    for key in RESUMABLE_CHANGES:
        saved.pop(key, None)
        now.pop(key, None)
    shard = ck / shard_name(fitter, meta["epoch"])
    if saved != now or meta.get("world", 1) != fitter.dist.world or not shard.exists():
        log.warning("checkpoint in %s does not match this config or process count: starting afresh", ck)
        return False
    t = load_file(str(shard))
    st = fitter.state
    st.epoch, st.metrics = meta["epoch"], meta["metrics"]
    st.best_epoch, st.best_nll, st.bad_epochs = meta["best_epoch"], meta["best_nll"], meta["bad_epochs"]
    fitter._restore(t)
    fitter.best = {k[len("best."):]: v for k, v in t.items() if k.startswith("best.")}
    fitter.load_extra_checkpoint(t)
    log.info("resumed from %s after epoch %d", ck, st.epoch)
    return True
