"""Checkpoints through the DeepSpeed engine (model, optimizer, scheduler, ZeRO partitions) plus what makes a
resumed run identical to an uninterrupted one: client state (step, data position, best metric, the resolved
config) and each rank's RNG state (rng_state_rank{R}.pt).

Layout::

    DIR/checkpoints/global_step{N}/     DeepSpeed files + rng_state_rank{R}.pt + config.json + manifest.json
    DIR/checkpoints/latest              names the newest complete step checkpoint
    DIR/checkpoints/best -> best_step{N}/   a symlink, swapped atomically to the new best
    DIR/checkpoints/.tmp-{TAG}/         a save in progress (invisible to resume; swept at the next start)

A checkpoint cannot be torn.  Every save, periodic, final and best, is written into a new ``.tmp-`` directory;
each rank reports the files it wrote and their sizes, and only when every rank succeeded does rank 0 write
``manifest.json`` (the file list with sizes), rename the directory into place and then update ``latest`` (or the
``best`` link) with an atomic ``os.replace``.  A kill at any moment leaves the previous checkpoints and pointers
as they were.  Resume checks the manifest (every file there, every size right) before DeepSpeed reads a byte;
``--resume auto`` falls back to the newest complete checkpoint, an explicit ``--resume DIR`` names what is
missing.

A checkpoint cannot run code.  DeepSpeed's loaders (its checkpoint engine, zero_to_fp32, the universal loader)
call ``torch.load(..., weights_only=False)``; inside :func:`safe_loading` every ``torch.load`` runs with
``weights_only=True`` and only the few plain data types DeepSpeed pickles are allow-listed, and :func:`scan`
refuses a file holding anything else before it is unpickled.

A full disk during a save is reported as "no space left on DEVICE"; the partial directory is removed and the
previous checkpoints are untouched.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import time

import torch

from engine import distributed as dist_utils
from engine.config import ConfigError

STEP_TAG = re.compile(r"^global_step(\d+)$")
BEST_TAG = re.compile(r"^best_step(\d+)$")
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
LOW_SPACE_BYTES = 64 << 20       # a failed write with less than this free is reported as a full disk


class CheckpointError(ConfigError):
    """A checkpoint that cannot be saved or loaded.  One line, exit 2 (a ConfigError)."""


_FAILPOINT_HITS: dict[str, int] = {}


def _failpoint(name: str) -> None:
    """Fault injection for tests (tests/test_faults.py): RDROP_FAILPOINT=NAME@N:ACTION makes the N-th pass through
    NAME on rank 0 ``kill`` the process (SIGKILL), ``sigterm`` it, or ``sleep=S``.  Unset: nothing happens."""
    spec = os.environ.get("RDROP_FAILPOINT")
    if not spec or not spec.startswith(name + "@") or os.environ.get("RANK", "0") != "0":
        return
    count, _, action = spec[len(name) + 1:].partition(":")
    _FAILPOINT_HITS[name] = _FAILPOINT_HITS.get(name, 0) + 1
    if _FAILPOINT_HITS[name] != int(count):
        return
    import signal
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action.startswith("sleep="):
        time.sleep(float(action[len("sleep="):]))


# ------------------------------------------------------------------------------------------------ safe loading
def allowed_globals() -> list:
    """The non-tensor types DeepSpeed 0.19 pickles into its checkpoints (found with
    torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3, bf16, offload).  Plain data only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _allowed_names() -> set[str]:
    return {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}


def unsafe_globals(path: str) -> list[str]:
    """Names of the pickled globals in ``path`` that weights_only loading would refuse (nothing is executed)."""
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    allowed = _allowed_names()
    return [g for g in found if g not in allowed]


def _refusal(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"refusing to load {path}: it holds pickled {what}, which is not checkpoint data and "
                           "would run code when unpickled (loading uses weights_only=True); only resume from "
                           "checkpoints this code wrote")


@contextlib.contextmanager
def safe_loading():
    """Every ``torch.load`` in the block (DeepSpeed's own included) runs with ``weights_only=True`` and
    DeepSpeed's data types allow-listed; anything else in a file raises a one-line CheckpointError."""
    original = torch.load
    allowed = allowed_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            m = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"global[: ]+'?([\w.]+)", str(e))
            raise _refusal(str(f), m.group(1) if m else "objects") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def scan(load_dir: str, tag: str, world) -> None:
    """Refuse (on every rank, with the same message) a checkpoint whose files hold pickled code.  The files are
    shared out over the ranks; only the pickle opcodes are read."""
    path = os.path.join(load_dir, tag)
    files = sorted(f for f in _listdir(path) if f.endswith(".pt"))
    problems = []
    for f in files[world.rank::world.world_size]:
        try:
            bad = unsafe_globals(os.path.join(path, f))
        except Exception as e:      # not a torch file at all (truncated, overwritten)
            problems.append(f"cannot read {os.path.join(path, f)} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]}): it is corrupt; pass another --resume checkpoint")
            continue
        if bad:
            problems.append(str(_refusal(os.path.join(path, f), ", ".join(bad))))
    problems = dist_utils.gather_problems(problems, world)
    if problems:
        raise CheckpointError(problems[0])


# ------------------------------------------------------------------------------------------------ saving
class _SaveRecorder:
    """Wraps the DeepSpeed engine's checkpoint engine during a save: records every file written with its size,
    and turns a failed write into a recorded error instead of an exception, so every rank still takes part in
    DeepSpeed's collectives and the ranks then decide together."""

    def __init__(self, ds_engine):
        self.ds_engine = ds_engine
        self.files: dict[str, int] = {}
        self.errors: list[str] = []
        self._patched = []

    def __enter__(self):
        ce = getattr(self.ds_engine, "checkpoint_engine", None)
        if ce is not None:
            original = ce.save

            def save(state_dict, path, *a, **k):
                self.write(path, lambda: original(state_dict, path, *a, **k))
            ce.save = save
            self._patched.append((ce, "save"))
        if hasattr(self.ds_engine, "_copy_recovery_script"):
            original_copy = self.ds_engine._copy_recovery_script

            def copy(save_path):
                try:
                    original_copy(save_path)
                except OSError as e:
                    self.errors.append(_describe_write_error(save_path, e))
            self.ds_engine._copy_recovery_script = copy
            self._patched.append((self.ds_engine, "_copy_recovery_script"))
        return self

    def write(self, path: str, fn) -> None:
        if self.errors:           # the disk is full already: do not write more, just keep in step
            return
        try:
            fn()
            self.files[os.path.basename(path)] = os.path.getsize(path)
        except (OSError, RuntimeError) as e:
            self.errors.append(_describe_write_error(path, e))

    def __exit__(self, *exc):
        for obj, name in self._patched:
            try:
                delattr(obj, name)           # back to the class's method
            except AttributeError:
                pass
        return False


def save(ds_engine, root: str, tag: str, client_state: dict, world, config: dict, keep_last: int = 0) -> str:
    """Save ``tag`` atomically (see the module docstring).  ``tag`` is ``global_step{N}`` or ``best``.
    Raises CheckpointError on every rank when any rank could not write its part."""
    is_best = tag == "best"
    step = int(client_state.get("step", 0))
    final_tag = f"best_step{step}" if is_best else tag
    tmp_tag = TMP_PREFIX + final_tag
    tmp = os.path.join(root, tmp_tag)
    problem = None
    if world.is_main:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            problem = _describe_write_error(tmp, e)
    problem = dist_utils.broadcast_object(problem, world)
    if problem:
        raise CheckpointError(f"checkpoint {final_tag} not saved: {problem}")

    with _SaveRecorder(ds_engine) as rec:
        rng_path = os.path.join(tmp, f"rng_state_rank{world.rank}.pt")
        rec.write(rng_path, lambda: torch.save(dist_utils.rng_state(), rng_path))
        ds_engine.save_checkpoint(root, tag=tmp_tag, client_state=client_state, save_latest=False)
    reports = dist_utils.all_gather_object((rec.files, rec.errors), world)
    errors = [e for _, errs in reports for e in errs]
    if world.is_main:
        _failpoint("save:written")
    if world.is_main and not errors:
        try:
            files: dict[str, int] = {}
            for f, _ in reports:
                files.update(f)
            _write_json(os.path.join(tmp, "config.json"), config)
            files["config.json"] = os.path.getsize(os.path.join(tmp, "config.json"))
            for name in _listdir(tmp):     # anything DeepSpeed wrote around its checkpoint engine
                p = os.path.join(tmp, name)
                if name not in files and os.path.isfile(p):
                    files[name] = os.path.getsize(p)
            _write_json(os.path.join(tmp, MANIFEST), {"tag": final_tag, "step": step, "world_size": world.world_size,
                                                      "files": files, "time": time.time()})
            _fsync_dir(tmp)
            _commit(root, tmp, final_tag, is_best)
            if keep_last and not is_best:
                prune(root, keep_last)
        except OSError as e:
            errors.append(_describe_write_error(tmp, e))
    if errors and world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)      # frees the space; the previous checkpoints are untouched
    errors = dist_utils.broadcast_object(errors, world)
    if errors:
        latest = read_pointer(os.path.join(root, "latest"))
        kept = f"the previous checkpoint {latest} is intact" if latest else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint {final_tag} not saved: {errors[0]}; {kept}: fix that and continue with "
                              "--resume auto")
    return os.path.join(root, "best" if is_best else final_tag)


def _commit(root: str, tmp: str, final_tag: str, is_best: bool) -> None:
    """Rename the finished directory into place, then move the pointer (``latest`` or the ``best`` link)."""
    final = os.path.join(root, final_tag)
    if os.path.lexists(final):            # saved again at the same step (a resumed run): keep the old one until
        old = os.path.join(root, TMP_PREFIX + "old-" + final_tag)   # the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _failpoint("save:renamed")
    if is_best:
        link = os.path.join(root, "best")
        previous = os.path.realpath(link) if os.path.islink(link) else None
        if os.path.isdir(link) and not os.path.islink(link):     # a best/ directory from an older version
            os.rename(link, os.path.join(root, "best_legacy"))
        tmp_link = os.path.join(root, TMP_PREFIX + "best-link")
        if os.path.lexists(tmp_link):
            os.unlink(tmp_link)
        os.symlink(final_tag, tmp_link)
        os.replace(tmp_link, link)
        _fsync_dir(root)
        if previous and os.path.basename(previous) != final_tag and BEST_TAG.match(os.path.basename(previous)):
            shutil.rmtree(previous, ignore_errors=True)
    else:
        write_pointer(os.path.join(root, "latest"), final_tag)


def write_pointer(path: str, tag: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def read_pointer(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def prune(root: str, keep_last: int) -> None:
    steps = sorted((int(m.group(1)), d) for d in _listdir(root) if (m := STEP_TAG.match(d)))
    latest = read_pointer(os.path.join(root, "latest"))
    for _, d in steps[:-keep_last]:
        if d != latest:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def sweep_partial(root: str) -> None:
    """Remove the directories of saves that never finished (rank 0, before training), and best_stepN
    directories the ``best`` link does not name (a kill between the rename and the link swap)."""
    link = os.path.join(root, "best")
    best = os.path.basename(os.path.realpath(link)) if os.path.islink(link) else None
    for d in _listdir(root):
        if BEST_TAG.match(d) and d != best:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
        elif d.startswith(TMP_PREFIX):
            p = os.path.join(root, d)
            if os.path.islink(p) or os.path.isfile(p):
                os.unlink(p)
            else:
                shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ verifying
def verify(load_dir: str, tag: str) -> str | None:
    """None when ``load_dir/tag`` is a complete checkpoint, else what is wrong with it (for one line)."""
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        return "the directory does not exist"
    if tag.startswith(TMP_PREFIX):
        return "it is a save that never finished"
    names = set(_listdir(path))
    if "zero" in names and os.path.isdir(os.path.join(path, "zero")):
        return None                         # a universal checkpoint (deepspeed.checkpoint.ds_to_universal)
    manifest = _read_json(os.path.join(path, MANIFEST))
    if manifest is None:
        return _verify_legacy(path, names)
    missing, short = [], []
    for name, size in manifest.get("files", {}).items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            missing.append(name)
        elif os.path.getsize(p) != size:
            short.append(f"{name} ({os.path.getsize(p)} of {size} bytes)")
    if missing:
        return f"missing {', '.join(missing[:4])}" + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    if short:
        return f"truncated {', '.join(short[:3])}"
    return None


def _verify_legacy(path: str, names: set) -> str | None:
    """A checkpoint without a manifest (written before manifests, or torn): check the files its config names."""
    cfg = _read_json(os.path.join(path, "config.json"))
    if cfg is None:
        return "no manifest.json and no config.json (the save did not finish)"
    world = int(cfg.get("world_size") or 1)
    stage = int(((cfg.get("ds_config_resolved") or {}).get("zero_optimization") or {}).get("stage", 0))
    need = [f"rng_state_rank{r}.pt" for r in range(world)]
    if stage == 3:
        need += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    else:
        need.append("mp_rank_00_model_states.pt")
    missing = [n for n in need if n not in names]
    if stage >= 1:
        for r in range(world):
            if not any(n.endswith(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for n in names):
                missing.append(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return f"no manifest.json and missing {', '.join(missing[:4])}" if missing else None


def _step_of(tag: str) -> int:
    m = STEP_TAG.match(tag)
    return int(m.group(1)) if m else -1


def find(resume: str, output_dir: str, universal: bool = False, log=print) -> tuple[str, str] | None:
    """(load_dir, tag) for --resume auto|PATH, or None when auto finds nothing to resume.

    auto (and a PATH holding ``latest``): the checkpoint ``latest`` names if it is complete, else the newest
    complete global_stepN, saying what was skipped and why.  With universal, ``latest_universal`` (written by
    deepspeed's ds_to_universal) is followed when it exists.  PATH naming one checkpoint: it must be complete."""
    if resume == "auto":
        root = os.path.join(output_dir, "checkpoints")
    else:
        path = os.path.normpath(resume)
        if not os.path.exists(path):
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory; pass --resume auto or a path "
                                  "like DIR/checkpoints/global_step100")
        if os.path.isfile(os.path.join(path, "latest")) or os.path.isfile(os.path.join(path, "latest_universal")):
            root = path
        else:
            load_dir, tag = os.path.dirname(path), os.path.basename(path)
            problem = verify(load_dir, tag)
            if problem:
                raise CheckpointError(f"--resume {resume}: checkpoint {path} is incomplete ({problem}): pass another "
                                      "checkpoint, or --resume auto to take the newest complete one")
            return load_dir, tag
    if universal and os.path.isfile(os.path.join(root, "latest_universal")):
        return root, read_pointer(os.path.join(root, "latest_universal"))
    latest = read_pointer(os.path.join(root, "latest"))
    steps = sorted((_step_of(d) for d in _listdir(root) if STEP_TAG.match(d)), reverse=True)
    candidates = ([latest] if latest else []) + [f"global_step{s}" for s in steps if f"global_step{s}" != latest]
    skipped = []
    for tag in candidates:
        problem = verify(root, tag)
        if problem is None:
            if skipped:
                log(f"[engine] warning: skipped incomplete checkpoint(s) {'; '.join(skipped)}: resuming from {tag}")
            return root, tag
        skipped.append(f"{os.path.join(root, tag)} ({problem})")
    if skipped:
        if resume != "auto":
            raise CheckpointError(f"--resume {resume}: no complete checkpoint there ({'; '.join(skipped[:2])}): "
                                  "pass another checkpoint")
        log(f"[engine] warning: no complete checkpoint to resume ({'; '.join(skipped[:2])}): starting from step 0")
    return None


# ------------------------------------------------------------------------------------------------ loading
def load(ds_engine, load_dir: str, tag: str, world) -> dict:
    """Load into the engine (weights_only, see :func:`safe_loading`) and restore this rank's RNG; returns the
    client state.  Call :func:`scan` first so that every rank refuses a bad checkpoint together."""
    path = os.path.join(load_dir, tag)
    try:
        with safe_loading():
            loaded, client = ds_engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not load checkpoint {path} ({type(e).__name__}: {first}): pass another "
                              "--resume checkpoint") from None
    if loaded is None:
        raise CheckpointError(f"could not load checkpoint {path}: it is incomplete or not a DeepSpeed checkpoint; "
                              "pass another --resume path")
    rng_file = os.path.join(path, f"rng_state_rank{world.rank}.pt")
    if os.path.isfile(rng_file) and client.get("world_size") == world.world_size:
        dist_utils.set_rng_state(torch.load(rng_file, weights_only=True))
    elif world.is_main:
        print(f"[engine] resuming on {world.world_size} ranks from a {client.get('world_size')}-rank checkpoint: "
              "dropout streams are reseeded (the data order is unchanged)", flush=True)
    replay_cpu_adam_steps(ds_engine)
    return client


def replay_cpu_adam_steps(ds_engine) -> None:
    """Make DeepSpeed's CPU Adam ops continue bit-identically after a resume.

    The CPU kernels behind FusedAdam (on the CPU accelerator) and DeepSpeedCPUAdam (optimizer offload) keep
    beta1**t and beta2**t in a C++ object as float32 running products (``_betta1_t *= beta1`` every step,
    csrc/includes/cpu_adam.h) and compute them with ``std::pow`` only when the step count jumps, as it does on
    the first step after a resume.  pow and the running product differ in the last bit at some steps (the first
    was step 6 of a run with the default betas), so a resumed run drifted from the uninterrupted one by 1 ulp.
    That state is not in any checkpoint; replaying the steps 1..t on a one-element tensor rebuilds exactly the
    running product the uninterrupted run holds (microseconds per step)."""
    opt = getattr(ds_engine, "optimizer", None)
    base = getattr(opt, "optimizer", opt)
    cls = type(base).__name__
    if cls not in ("FusedAdam", "DeepSpeedCPUAdam"):
        return
    steps = [int(s["step"]) for s in base.state.values() if isinstance(s, dict) and "step" in s]
    step = max(steps) if steps else 0
    groups = [g for g in base.param_groups if g.get("params")]
    if step <= 0 or not groups:
        return
    beta1, beta2 = groups[0]["betas"]
    one = lambda: torch.zeros(1, dtype=torch.float32)   # noqa: E731
    if cls == "FusedAdam":
        if getattr(base, "multi_tensor_adam", None) is None or base._dummy_overflow_buf.device.type != "cpu":
            return                      # the CUDA kernel computes the powers from the step every time
        mode = int(base.adam_w_mode)
        for t in range(1, step + 1):
            base.multi_tensor_adam(2048 * 32, base._dummy_overflow_buf, [[one()], [one()], [one()], [one()]],
                                   0.0, beta1, beta2, 1e-8, t, mode, 1, 0.0)
    else:
        for t in range(1, step + 1):
            base.ds_opt_adam.adam_update(base.opt_id, t, 0.0, beta1, beta2, 1e-8, 0.0, True, one(), one(), one(),
                                         one())


def saved_config(load_dir: str, tag: str) -> dict | None:
    return _read_json(os.path.join(load_dir, tag, "config.json"))


def fp32_state_dict(root: str, tag: str) -> dict:
    """Consolidated fp32 weights of a saved ZeRO checkpoint (DeepSpeed's zero_to_fp32), loaded weights_only.
    Used by tools that work on checkpoints without an engine (checkpoint averaging)."""
    scan(root, tag, dist_utils.World(0, 1, 0, 1, torch.device("cpu"), "gloo"))
    with safe_loading():
        states = os.path.join(root, tag, "mp_rank_00_model_states.pt")
        if os.path.isfile(states) and not any("optim_states" in f for f in _listdir(os.path.join(root, tag))):
            return {k: v.float() for k, v in torch.load(states, map_location="cpu")["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)


# ------------------------------------------------------------------------------------------------ export
def consolidated_state_dict(ds_engine, world) -> dict | None:
    """The model's full fp32 state dict gathered over the process group (every rank must call this; rank 0 gets
    the dict, the others None).  Parameters come from the optimizer's fp32 master copy where ZeRO or bf16 keeps
    one (DeepSpeed's safe_get_full_fp32_param), else from the module; buffers from the module.  Nothing is read
    from disk, so this works whether or not the nodes share a file system."""
    from deepspeed.utils import safe_get_full_fp32_param
    module = ds_engine.module
    out: dict = {} if world.is_main else None
    done: dict[int, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if isinstance(t, torch.nn.Parameter):
            if id(t) not in done:
                full = safe_get_full_fp32_param(t)
                if full is None and hasattr(t, "ds_id"):          # ZeRO-3 parameter outside the optimizer
                    import deepspeed
                    with deepspeed.zero.GatheredParameters([t]):
                        full = t.detach().clone()
                elif full is None:
                    full = t.detach()
                done[id(t)] = full.detach().float().cpu().clone() if world.is_main else None
            value = done[id(t)]
        else:
            value = t.detach().float().cpu().clone() if (world.is_main and t.is_floating_point()) else \
                (t.detach().cpu().clone() if world.is_main else None)
        if world.is_main:
            out[name] = value
    return out


# ------------------------------------------------------------------------------------------------ helpers
def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def device_of(path: str) -> str:
    """The device (file system source) holding ``path``, e.g. /dev/nvme0n1p1, from /proc/mounts."""
    mnt = mount_point(path)
    device = mnt
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1 and parts[1] == mnt:
                    device = parts[0]
    except OSError:
        pass
    return device if device == mnt else f"{device} (mounted at {mnt})"


def free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(mount_point(path))
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _describe_write_error(path: str, e: BaseException) -> str:
    """One phrase for a failed checkpoint write.  torch.save reports a full disk as a C++ stream error without
    errno ("basic_ios::clear: iostream error", "unexpected pos"), so the free space decides."""
    free = free_bytes(os.path.dirname(path) or ".")
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (free is not None and
                                                                             free < LOW_SPACE_BYTES):
        return f"no space left on {device_of(path)}, {free or 0} bytes free"
    if isinstance(e, OSError) and e.strerror:
        return f"cannot write {e.filename or path} ({e.strerror})"
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return f"cannot write {path} ({type(e).__name__}: {first})"
