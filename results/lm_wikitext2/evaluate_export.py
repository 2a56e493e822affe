"""Perplexities of an exported LM (RUN/hf_model) through the Auto classes -- no engine, no DeepSpeed in the scoring
-- with the run's windows (language_model.json):

  test           WikiText-2's test split: must equal the engine's final test_ppl (the export check at full scale)
  train_seen     N training blocks the run trained on (eval mode: no dropout), drawn with a fixed seed from the
                 blocks of its first STEPS steps, reconstructed with the engine's own token batching (engine/data.py)
  train_unseen   N training blocks it never saw in those steps (same distribution as train_seen, held out)

so that train_seen vs valid (or train_unseen) is the train-valid gap measured the same way for both arms.

    PYTHONPATH=. python results/lm_wikitext2/evaluate_export.py RUN/hf_model ../shared/data/wikitext-2 STEPS \\
        MAX_TOKENS WORLD_SIZE SEED [N_BLOCKS]
"""
import json
import math
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


def encode(tok, lines):
    """Every line then the end-of-line symbol, as one stream (the engine's encoding)."""
    return [i for line in lines for i in tok(line.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]


def windows(stream, eos, window, context):
    """The engine's LMBlocks: (input, first scored position, targets) for every window."""
    new, out = window - context, []
    for s in range(0, len(stream), new):
        start, end = max(0, s - context), min(s + new, len(stream))
        inputs = ([eos] + stream[:end - 1]) if start == 0 else stream[start - 1:end - 1]
        out.append((inputs, s - start, stream[s:end]))
    return out


def score(model, items, batch=16):
    """Summed NLL and scored tokens of ``items``; windows of equal length go through the model together."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for length in sorted({len(x[0]) for x in items}):
            same = [x for x in items if len(x[0]) == length]
            for b in range(0, len(same), batch):
                chunk = same[b:b + batch]
                logits = model(input_ids=torch.tensor([x[0] for x in chunk])).logits.float()
                for row, (_, first, target) in zip(logits, chunk):
                    nll += F.cross_entropy(row[first:], torch.tensor(target), reduction="sum").item()
                    tokens += len(target)
    return {"tokens": tokens, "loss": nll / tokens, "ppl": math.exp(nll / tokens)}


def main():
    path, data = sys.argv[1], sys.argv[2]
    steps, max_tokens, world, seed = (int(x) for x in sys.argv[3:7])
    n_sample = int(sys.argv[7]) if len(sys.argv) > 7 else 1700
    torch.set_num_threads(1)
    info = json.load(open(f"{path}/language_model.json"))
    window, context = info["eval_tokens_per_sample"], info["context_window"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    read = lambda split: open(f"{data}/wiki.{split}.tokens", encoding="utf-8").read().split("\n")[:-1]  # noqa
    out = {"export": path, "window": window, "context": context}
    for split in ("test", "valid"):
        t0 = time.time()
        out[split] = score(model, windows(encode(tok, read(split)), tok.eos_token_id, window, context))
        out[split]["seconds"] = round(time.time() - t0, 1)
    # training blocks: tokens_per_sample long, no context (the blocks the run trained on)
    from engine.data import TokenBatches
    block = info["tokens_per_sample"]
    train = windows(encode(tok, read("train")), tok.eos_token_id, block, 0)
    sizes = np.array([len(x[0]) for x in train])
    batches = TokenBatches(sizes, max_tokens, seed)
    per_epoch = len(batches.batches) // world                 # accumulation 1
    used = set()
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        for b in batches.epoch(epoch)[k * world:(k + 1) * world]:
            used.update(b)
    unused = sorted(set(range(len(train))) - used)
    rng = random.Random(0)
    for name, pool in (("train_seen", sorted(used)), ("train_unseen", unused)):
        pick = sorted(rng.sample(pool, min(n_sample, len(pool))))
        t0 = time.time()
        out[name] = score(model, [train[i] for i in pick])
        out[name].update(blocks=len(pick), pool=len(pool), seconds=round(time.time() - t0, 1))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
