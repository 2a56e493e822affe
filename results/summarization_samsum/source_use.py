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
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer


def main():
    path, data = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True).eval()   # a copy model brings its code
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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
