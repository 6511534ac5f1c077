"""Sharded profile fit: ``torchrun --nproc_per_node N -m userip.profile.fit --data D --out R [...]``.

Each rank holds a frozen LLM replica and only its users' soft tokens and optimiser state; the shared prompt's
gradient and the M-step's per-code sums and counts are all-reduced (gloo on CPU, NCCL on GPU); rank 0 writes
codebooks, merged IDs and metrics; each rank checkpoints its shard, and rerunning the command resumes.
`userip profile fit --nproc N` launches this for you.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def launch(nproc: int, args: list[str]) -> int:
    """Run this module under torchrun with ``nproc`` local processes; returns torchrun's exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "userip.profile.fit", *args]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--config")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-users", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--previous", help="a previous PROFILES dir whose IDs this refit keeps where it can")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and os.environ.get("USERIP_DEVICE", "") != "cpu" else "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    try:
        world = dist.get_world_size()
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        threads = a.threads or max(1, (os.cpu_count() or 1) // world)
        from userip.profile.api import fit_profiles

        metrics = fit_profiles(Path(a.data), Path(a.out), model=a.model, config=a.config, epochs=a.epochs,
                               max_users=a.max_users, seed=a.seed, threads=threads, previous=a.previous,
                               device=device if device == "cuda" else None, progress=dist.get_rank() == 0)
        if dist.get_rank() == 0:
            from rich.console import Console

            from userip.profile.report import summary_table

            Console().print(summary_table(metrics))
            print(f"wrote {a.out} with {world} processes in {metrics['wall_s']:.0f}s")
    finally:
        # every rank reaches the end before any tears down gloo: a rank that exits while its peer still holds
        # the connection can abort at shutdown ("terminate called without an active exception")
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo's worker threads can still be alive when C++ statics are destroyed,
    # which aborts a finished rank ("terminate called without an active exception"). Outputs are on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
