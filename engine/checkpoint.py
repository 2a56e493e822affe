"""Checkpoints through the DeepSpeed engine (model, optimizer, scheduler, ZeRO partitions) plus what makes a
resumed run identical to an uninterrupted one: client state (step, data position, best metric, the resolved
config) and each rank's RNG state (rng_state_rank{R}.pt, loadable with weights_only=True).

Layout: DIR/checkpoints/global_step{N}/ (DeepSpeed files + rng + config.json), DIR/checkpoints/best/,
DIR/checkpoints/latest (written by rank 0 only after every rank finished, so it never names a partial save).
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch

from engine import distributed as dist_utils
from engine.config import ConfigError

STEP_TAG = re.compile(r"^global_step(\d+)$")


def save(ds_engine, root: str, tag: str, client_state: dict, world, config: dict, keep_last: int = 0) -> str:
    path = os.path.join(root, tag)
    os.makedirs(path, exist_ok=True)
    torch.save(dist_utils.rng_state(), os.path.join(path, f"rng_state_rank{world.rank}.pt"))
    ds_engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    dist_utils.barrier()
    if world.is_main:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
        if STEP_TAG.match(tag):
            tmp = os.path.join(root, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(root, "latest"))
            if keep_last:
                prune(root, keep_last)
    dist_utils.barrier()
    return path


def prune(root: str, keep_last: int) -> None:
    steps = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := STEP_TAG.match(d)))
    for _, d in steps[:-keep_last]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def find(resume: str, output_dir: str, universal: bool = False) -> tuple[str, str] | None:
    """(load_dir, tag) for --resume auto|PATH, or None when auto finds nothing to resume.  With universal,
    auto follows ``latest_universal`` (written by deepspeed's ds_to_universal) when it exists."""
    if resume == "auto":
        root = os.path.join(output_dir, "checkpoints")
        latest = os.path.join(root, "latest")
        if universal and os.path.isfile(os.path.join(root, "latest_universal")):
            latest = os.path.join(root, "latest_universal")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            return root, f.read().strip()
    path = os.path.normpath(resume)
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return path, f.read().strip()
    if os.path.isdir(path):
        return os.path.dirname(path), os.path.basename(path)
    raise ConfigError(f"--resume {resume}: no such checkpoint directory; pass --resume auto or a path like "
                      "DIR/checkpoints/global_step100")


def load(ds_engine, load_dir: str, tag: str, world) -> dict:
    """Load into the engine and restore this rank's RNG; returns the client state."""
    path, client = ds_engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True)
    if path is None:
        raise ConfigError(f"could not load checkpoint {os.path.join(load_dir, tag)}: it is incomplete or not a "
                          "DeepSpeed checkpoint; pass another --resume path")
    rng_file = os.path.join(load_dir, tag, f"rng_state_rank{world.rank}.pt")
    if os.path.isfile(rng_file) and client.get("world_size") == world.world_size:
        dist_utils.set_rng_state(torch.load(rng_file, weights_only=True))
    elif world.is_main:
        print(f"[engine] resuming on {world.world_size} ranks from a {client.get('world_size')}-rank checkpoint: "
              "dropout streams are reseeded (the data order is unchanged)", flush=True)
    return client


def saved_config(load_dir: str, tag: str) -> dict | None:
    p = os.path.join(load_dir, tag, "config.json")
    if os.path.isfile(p):
        with open(p) as f:
            return json.load(f)
    return None
