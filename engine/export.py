"""Complete Hugging Face export folders: what turns saved weights into something a user loads in one line.

Every export the trainer writes (DIR/hf_model = the final weights, DIR/best_model = the best checkpoint) is
``save_pretrained`` weights + config (``Task.export``: the task adds its tokenizer or image processor and its label
names) completed here with

  README.md     the model card: task, data, labels, the metrics the engine measured for THESE weights, the R-Drop
                settings, the training settings and the exact command line that trained it, and how to use it
  export.json   the same facts, machine-readable (``python -m engine.predict`` reads ``pipeline_tag``,
                ``pipeline_kwargs`` and ``inputs`` from it)

What a task contributes is ``Task.export_info()`` (engine/task.py).  Helpers the tasks share:

  label_config(names)         id2label / label2id for a model config, names in class-id order
  write_label_names(dir, ...) the same, patched into an already saved config.json
  fast_tokenizer / save_fast_tokenizer
                              a ``tokenizers.Tokenizer`` (a trained BPE) as a transformers
                              PreTrainedTokenizerFast with its special tokens, model_max_length and optional
                              post-processing template, so AutoTokenizer loads it without this repository
  copy_assets(src, dst)       everything but the weights (tokenizer, processor, generation config, card) from one
                              export folder to another: for checkpoint averages built from a template export
  consolidated_state_dict     fp32 weights of a checkpoint tag (ZeRO 1-3 partitions merged, or ZeRO-0's file)
  command_record(cfg, world)  the command line of the run, kept across --resume (written into DIR/config.json)
"""
from __future__ import annotations

import json
import os
import shlex
import shutil

from engine.config import LAUNCHER_FLAGS, ConfigError

CARD = "README.md"
MANIFEST = "export.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "config.json")


# ---------------------------------------------------------------------------------------------- labels

def label_config(names) -> dict:
    """``{"id2label": {0: names[0], ...}, "label2id": {names[0]: 0, ...}}`` for a model config."""
    names = [str(n) for n in names]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"label names must be distinct, {dup} occur twice: fix the label names")
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def write_label_names(out_dir: str, names, problem_type: str | None = None) -> None:
    """Patch id2label / label2id (and problem_type) into an exported config.json."""
    path = os.path.join(out_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    labels = label_config(names)
    cfg["id2label"] = {str(k): v for k, v in labels["id2label"].items()}
    cfg["label2id"] = labels["label2id"]
    if problem_type:
        cfg["problem_type"] = problem_type
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


# ---------------------------------------------------------------------------------------------- tokenizers

def fast_tokenizer(tokenizer, special_tokens: dict[str, str] | None = None, *, model_max_length: int | None = None,
                   template: str | None = None, pair_template: str | None = None, padding_side: str = "right",
                   additional_special_tokens: list[str] | None = None, **init_kwargs):
    """A ``transformers.PreTrainedTokenizerFast`` around a ``tokenizers.Tokenizer`` (e.g. a BPE the run trained).

    special_tokens   {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", ...}:
                     each must already be in the vocabulary (their ids are the model's; nothing is added)
    model_max_length the longest input the model was trained with (``truncation=True`` truncates to it)
    template         a post-processing template (tokenizers' TemplateProcessing), e.g. "$A </s>" to append EOS
                     to every encoded text as fairseq does; pair_template for pairs (default: template applied to
                     $A then $B:1).  None keeps the tokenizer's own post-processor.
    The caller's tokenizer is not modified (a copy is wrapped); truncation and padding stored inside a
    tokenizer.json are cleared, because the wrapper sets them per call."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    special_tokens = dict(special_tokens or {})
    unknown = sorted(set(special_tokens) - set(SPECIAL_TOKEN_KEYS))
    if unknown:
        raise ConfigError(f"unknown special token keys {unknown}: use {', '.join(SPECIAL_TOKEN_KEYS)}")
    tok = Tokenizer.from_str(tokenizer.to_str())
    wanted = list(special_tokens.values()) + list(additional_special_tokens or [])
    missing = [t for t in wanted if tok.token_to_id(t) is None]
    if missing:
        raise ConfigError(f"special tokens {missing} are not in the tokenizer's vocabulary: train the tokenizer "
                          "with them (tokenizers' trainer special_tokens=[...]) so their ids are fixed")
    if template:
        pair = pair_template or f"{template} {template.replace('$A', '$B:1')}"
        names = {w.split(":")[0] for w in f"{template} {pair}".split() if not w.startswith("$")}
        specials = [(n, tok.token_to_id(n)) for n in sorted(names)]
        absent = [n for n, i in specials if i is None]
        if absent:
            raise ConfigError(f"template {template!r} uses {absent}, not in the vocabulary: fix the template")
        tok.post_processor = processors.TemplateProcessing(single=template, pair=pair, special_tokens=specials)
    tok.no_truncation()
    tok.no_padding()
    kwargs = dict(special_tokens, padding_side=padding_side, **init_kwargs)
    if model_max_length:
        kwargs["model_max_length"] = int(model_max_length)
    if additional_special_tokens:
        kwargs["additional_special_tokens"] = list(additional_special_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def save_fast_tokenizer(tokenizer, out_dir: str, special_tokens: dict[str, str] | None = None, **kwargs):
    """``fast_tokenizer(...)`` saved into ``out_dir`` (tokenizer.json + tokenizer_config.json); returns it.

    tokenizer_config.json names the class ``PreTrainedTokenizerFast`` (transformers 5 calls it TokenizersBackend
    and accepts both names; transformers 4 knows only the first), so ``AutoTokenizer.from_pretrained(out_dir)``
    loads exactly this tokenizer whatever model_type config.json holds."""
    fast = fast_tokenizer(tokenizer, special_tokens, **kwargs)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return fast


STALE_TOKENIZER_KEYS = ("is_local", "local_files_only", "max_length", "stride", "truncation_strategy", "name_or_path")


def clean_tokenizer_files(out_dir: str) -> None:
    """After ``tokenizer.save_pretrained(out_dir)``: drop what describes the last call or the machine rather than
    the tokenizer (a truncation/padding state left inside tokenizer.json, local-loading flags, a stale
    max_length beside model_max_length), so the saved folder reads the same wherever it is loaded."""
    path = os.path.join(out_dir, "tokenizer.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
        if tok.get("truncation") is not None or tok.get("padding") is not None:
            tok["truncation"], tok["padding"] = None, None
            with open(path, "w", encoding="utf-8") as f:
                json.dump(tok, f, ensure_ascii=False)
    path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        for k in STALE_TOKENIZER_KEYS:
            cfg.pop(k, None)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")


def copy_assets(src_dir: str, dst_dir: str) -> list[str]:
    """Copy every file of an export folder except the weights and config.json (tokenizer files, image processor,
    generation config, README.md, export.json); returns the names copied."""
    os.makedirs(dst_dir, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and name not in WEIGHT_FILES and not name.startswith("model-"):
            shutil.copy(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------------------------- weights

def consolidated_state_dict(ckpt_root: str, tag: str, stage: int) -> dict:
    """fp32 weights of checkpoint ``ckpt_root/tag``: ZeRO 1-3 partitions merged by DeepSpeed's zero_to_fp32; under
    ZeRO-0 (where that API fails) the module state of mp_rank_00_model_states.pt."""
    import torch
    if stage >= 1:
        from engine.checkpoint import fp32_state_dict     # zero_to_fp32 with every torch.load weights_only
        return fp32_state_dict(ckpt_root, tag)
    path = os.path.join(ckpt_root, tag, "mp_rank_00_model_states.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)["module"]
    return {k: v.detach().float() if v.is_floating_point() else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- the command

def detect_launcher() -> str:
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")):
        return "mpirun"
    if "LOCAL_SIZE" in env or "CROSS_RANK" in env:
        return "deepspeed"
    return "python"


def format_command(argv: list[str]) -> str:
    """``python -m engine.train ARGS`` without the flags launchers append (``--local_rank``)."""
    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        key = a[2:].split("=", 1)[0].replace("-", "_") if a.startswith("--") else ""
        if key in LAUNCHER_FLAGS:
            skip = "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        args.append(a)
    return "python -m engine.train " + shlex.join(args)


def command_record(cfg, world_size: int) -> dict:
    """``{"run_command": {...}}`` for DIR/config.json: the command that started the run, its launcher and ranks.
    On --resume the first run's record is kept and this one is appended to ``resumed_with``."""
    rec = {"command": format_command(list(getattr(cfg, "argv", None) or [])), "launcher": detect_launcher(),
           "world_size": world_size}
    previous = {}
    path = os.path.join(cfg.output_dir, "config.json")
    if cfg.resume and os.path.isfile(path):
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}
    if previous.get("run_command"):
        return {"run_command": previous["run_command"], "resumed_with": previous.get("resumed_with", []) + [rec]}
    return {"run_command": rec}


# ---------------------------------------------------------------------------------------------- card + manifest

def best_eval_record(output_dir: str, metric: str, mode: str) -> dict | None:
    """The evaluation that made DIR/checkpoints/best: the first record with the best value of ``metric``
    (the trainer saves best only on a strict improvement)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    best = None
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("kind") != "eval" or metric not in r:
                continue
            if best is None or (r[metric] > best[metric] if mode == "max" else r[metric] < best[metric]):
                best = r
    return best


def manifest(trainer, which: str) -> dict:
    """export.json: what the weights are, what they scored, how they were trained and how to run them."""
    cfg, task = trainer.cfg, trainer.task
    info = dict(task.export_info() or {})
    if which == "best":
        rec = best_eval_record(cfg.output_dir, task.metric, task.metric_mode) or {}
        step = rec.get("step")
        metrics = {k: v for k, v in rec.items() if k not in ("kind", "step")}
        split = trainer.eval_split
    else:
        fm = dict(trainer.final_metrics)
        step, split = fm.pop("step", None), fm.pop("split", trainer.eval_split)
        metrics = fm
    resolved = getattr(trainer, "resolved", {}) or {}
    return {
        "format": 1,
        "task": cfg.task,
        "task_args": resolved.get("task_args", {}),
        "weights": which,
        "step": step,
        "total_steps": getattr(trainer, "total_steps", None),
        "selected_by": f"{task.metric} ({task.metric_mode})" if which == "best" else None,
        "eval_split": split,
        "metrics": metrics,
        "rdrop": {"mode": cfg.rdrop.mode, "alpha": cfg.rdrop.alpha, "alpha_schedule": cfg.rdrop.alpha_schedule},
        "training": {"max_steps": getattr(trainer, "total_steps", None), "micro_batch_size": cfg.train.micro_batch_size,
                     "grad_accum": cfg.train.grad_accum, "world_size": trainer.world.world_size,
                     "optimizer": cfg.optim.name, "lr": cfg.optim.lr, "schedule": cfg.optim.schedule,
                     "warmup_steps": cfg.optim.warmup_steps, "ds_config": cfg.ds_config, "seed": cfg.seed},
        "run_command": resolved.get("run_command"),
        "resumed_with": resolved.get("resumed_with", []),
        "pipeline_tag": info.get("pipeline_tag"),
        "pipeline_kwargs": info.get("pipeline_kwargs", {}),
        "inputs": info.get("inputs", {}),
        "labels": info.get("labels"),
        "data": info.get("data", ""),
        "usage": info.get("usage", ""),
    }


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def model_card(m: dict, path: str) -> str:
    """README.md text from a manifest; ``path`` is how the card refers to the folder in code."""
    tag = m.get("pipeline_tag")
    front = ["---", "library_name: transformers"] + ([f"pipeline_tag: {tag}"] if tag else []) + \
        ["tags:", "- r-drop", "- deepspeed", f"- {m['task']}", "---", ""]
    name = m["task"] + (f" {m['task_args'].get('name')}" if m["task_args"].get("name") else "")
    if m["weights"] == "best":
        metric, _, mode = m["selected_by"].rstrip(")").partition(" (")
        which = f"the weights of the best checkpoint ({'highest' if mode == 'max' else 'lowest'} {metric}" + \
            (f", step {m['step']} of {m['total_steps']})" if m["step"] is not None else ")")
    else:
        which = f"the final weights (step {m['step']} of {m['total_steps']})"
    r, t = m["rdrop"], m["training"]
    rdrop = ("none (baseline)" if r["mode"] == "none" else
             f"mode {r['mode']}, alpha {r['alpha']} ({r['alpha_schedule']})")
    labels = m.get("labels")
    lines = front + [
        f"# {name} (R-Drop on DeepSpeed)", "",
        f"These are {which} of a run of the R-Drop on DeepSpeed engine, exported as a complete Hugging Face "
        "folder: weights, config with label names, " + ("tokenizer" if tag and "text" in tag else
                                                        "image processor" if tag and "image" in tag else
                                                        "preprocessing") + " and this card.", "",
        "| | |", "|---|---|",
        f"| task | `{m['task']}`" + (f" ({tag})" if tag else "") + " |",
        f"| data | {m.get('data') or '(see the command)'} |",
    ]
    if labels:
        shown = ", ".join(map(str, labels[:20])) + (f", ... ({len(labels)} in all)" if len(labels) > 20 else "")
        lines.append(f"| labels | {shown} |")
    lines += [
        f"| R-Drop | {rdrop} |",
        f"| training | {t['max_steps']} steps, micro-batch {t['micro_batch_size']} x accumulation {t['grad_accum']} "
        f"x {t['world_size']} rank(s), {t['optimizer']} lr {t['lr']} ({t['schedule']}, warmup {t['warmup_steps']}), "
        f"`{t['ds_config']}`, seed {t['seed']} |",
        "",
        f"## Metrics ({m['eval_split']} split, step {m['step']}, measured by the engine)", "",
    ]
    if m["metrics"]:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in m["metrics"].items()]
    else:
        lines.append("(no evaluation ran for these weights)")
    lines += ["", "## Command that trained it", ""]
    rc = m.get("run_command")
    if rc:
        lines += ["```bash", rc["command"], "```", "",
                  f"Launcher: {rc['launcher']}, {rc['world_size']} rank(s)"
                  + (" (through the launcher; the line above is what every rank ran)." if rc["launcher"] != "python"
                     else ".")]
        for x in m.get("resumed_with") or []:
            lines.append(f"Resumed with `{x['command']}` ({x['launcher']}, {x['world_size']} rank(s)).")
    else:
        lines.append("(not recorded)")
    if m.get("usage"):
        lines += ["", "## Use", "", m["usage"].replace("{path}", path).rstrip()]
    if tag in ("text-classification", "image-classification"):
        lines += ["", "Or over a file, without DeepSpeed (a clone of the engine's repository):", "", "```bash",
                  f"python -m engine.predict --model {path} --input FILE --output predictions.tsv", "```"]
    return "\n".join(lines) + "\n"


def complete(trainer, out_dir: str, which: str = "final") -> None:
    """Write export.json and README.md into an export folder the task has filled (rank 0)."""
    m = manifest(trainer, which)
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(m, f, indent=2, default=str)
        f.write("\n")
    with open(os.path.join(out_dir, CARD), "w", encoding="utf-8") as f:
        f.write(model_card(m, out_dir))


def export_best(trainer) -> str | None:
    """DIR/best_model from DIR/checkpoints/best, a complete folder like DIR/hf_model (rank 0; needs
    --checkpoint.save_best and --checkpoint.export_best, both on by default)."""
    cfg = trainer.cfg
    ck = cfg.checkpoint
    if not (getattr(ck, "export_best", True) and ck.save_best) or trainer.best is None:
        return None
    if not os.path.isdir(os.path.join(trainer.ckpt_root, "best")):
        return None
    out = os.path.join(cfg.output_dir, "best_model")
    sd = consolidated_state_dict(trainer.ckpt_root, "best", trainer.stage)
    trainer.task.export(trainer.engine.module, sd, out)
    complete(trainer, out, "best")
    return out
