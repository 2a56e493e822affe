"""Does a summarizer use its source? Mean NLL per target token of the reference summaries given their own dialogue
vs given another dialogue (the sources shifted by one), through the export (AutoModelForSeq2SeqLM). A model that
ignores its encoder scores both the same.

    PYTHONPATH=. python results/summarization_samsum/source_use.py RUN/hf_model ../shared/data/samsum [N]
"""
import csv
import gzip
import json
import sys

import torch
from transformers import AutoTokenizer


def source_use(path: str, data: str, n: int = 200) -> dict:
    """{"own_dialogue": NLL, "another_dialogue": NLL, "examples": n} for the export at ``path``."""
    from tasks.summarization import Summarization, _remote_code
    tok = AutoTokenizer.from_pretrained(path, **_remote_code(path))
    model = Summarization.load_exported(path).eval()       # trust_remote_code only for a model with its own code
    with gzip.open(f"{data}/samsum-validation.csv.gz", "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["dialogue"].strip() and r["summary"].strip()][:n]
    src, tgt = [r["dialogue"] for r in rows], [r["summary"] for r in rows]
    out = {}
    for name, sources in (("own_dialogue", src), ("another_dialogue", src[1:] + src[:1])):
        nll, tokens = 0.0, 0
        with torch.no_grad():
            for s, t in zip(sources, tgt):
                enc = tok(s, return_tensors="pt", truncation=True, max_length=512)
                labels = tok(text_target=t, return_tensors="pt").input_ids
                loss = model(**enc, labels=labels).loss.item()
                nll += loss * labels.shape[1]
                tokens += labels.shape[1]
        out[name] = round(nll / tokens, 4)
    out["examples"] = len(rows)
    return out


def main():
    torch.set_num_threads(1)
    print(json.dumps(source_use(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 200)))


if __name__ == "__main__":
    main()
