"""JSON-lines input, read the same way everywhere (task data, ``engine.predict`` inputs): one object per line,
blank lines skipped, and a bad line is one error that names the file and the line and says how to fix it."""
from __future__ import annotations

import json
from typing import Iterable, Iterator


def json_lines(lines: Iterable[str], path: str, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of ``lines`` (an open text file); raises ``error``."""
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise error(f"{path} line {number}: not valid JSON ({e.msg}): fix or remove the line") from None
        if not isinstance(rec, dict):
            raise error(f"{path} line {number}: not a JSON object: write one object per line")
        yield number, rec
