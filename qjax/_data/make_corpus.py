"""Build qjax/_data/pydoc_corpus.json.gz, the English corpus shipped with qjax (run once).

  python qjax/_data/make_corpus.py            # writes the file next to this script

Source: the topic help texts of CPython's `pydoc_data.topics` (the Python documentation, Copyright
Python Software Foundation, PSF License Agreement), here from the Python that runs the script; the
shipped file records that version. The file, not this script, is the corpus: qjax never re-reads
`pydoc_data` at run time, so every machine sees the same text whatever its Python.

What the file holds (JSON, gzip with mtime 0 so rebuilding with the same Python is byte-identical):
  blocks:     {split: [text block, ...]}  every blank-line separated block of every topic (prose,
              code, grammar, tables) with its whitespace; the byte-level LM's text.
  paragraphs: {split: [paragraph, ...]}   the prose blocks of that split, lines joined by spaces.
  sentences:  {split: [sentence, ...]}    unique prose sentences of 3 to 80 words.
Splits are 'calibration' / 'heldout' / 'test'. Blocks (and their paragraphs) are assigned by a
hash of their words, so text repeated in two topics stays in one split: 80% / 10% / 10%.
Sentences form their own partition, ordered by a hash of their text: 2,000 'heldout' (MiniLM's
retrieval set), 200 'calibration', the rest 'test'.
The two partitions are independent: each is disjoint within itself, and no experiment mixes them
(the byte LM uses blocks, MiniLM uses sentences).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sys

SPLITS = ("calibration", "heldout", "test")
N_HELDOUT_SENTENCES = 2000
N_CALIBRATION_SENTENCES = 200
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"(*])')
_LIST_ITEM = re.compile(r"(\*|\d+\.) ")  # bullet or numbered item marker


def _hash(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_prose(block: str) -> bool:
  """Wrapped prose: one indentation for every line, ends like a sentence, mostly letters, and no
  interpreter prompts, grammar rules, tables or section underlines."""
  lines = [l for l in block.split("\n") if l.strip()]
  if not lines:
    return False
  indents = [len(l) - len(l.lstrip()) for l in lines]
  item = _LIST_ITEM.match(lines[0].lstrip())
  hanging = indents[0] + (len(item.group(0)) if item else 0)  # a list item's wrapped lines
  if any(i != hanging for i in indents[1:]):
    return False
  if re.fullmatch(r"[*=\-^~]+", lines[-1].strip()):
    return False
  text = prose_text(block)
  if any(s in text for s in (">>>", "::=", "|", "+--")):
    return False
  if not re.search(r'[.:?!)"]$', text) or len(text.split()) < 4:
    return False
  return sum(c.isalpha() or c == " " for c in text) / len(text) > 0.8


def is_definition(block: str) -> bool:
  """A definition-list entry: a short term line, then lines indented deeper than it."""
  lines = [l for l in block.split("\n") if l.strip()]
  if len(lines) < 2 or not block.split("\n", 1)[1].strip():
    return False
  term = len(lines[0]) - len(lines[0].lstrip())
  return all(len(l) - len(l.lstrip()) > term for l in lines[1:]) and len(lines[0]) < 80


def prose_text(block: str) -> str:
  """A prose block as one line: lines stripped and joined, a list item's marker dropped."""
  text = " ".join(l.strip() for l in block.split("\n") if l.strip())
  return _LIST_ITEM.sub("", text, count=1) if _LIST_ITEM.match(text) else text


def block_split(block: str) -> str:
  """By a hash of the words (of the prose, for a prose block): a block or paragraph repeated in
  several topics lands in one split."""
  r = _hash(" ".join(block.split())) % 10
  return "test" if r == 0 else "heldout" if r == 1 else "calibration"


def build(topics: dict[str, str]) -> dict:
  blocks = {s: [] for s in SPLITS}
  paragraphs = {s: [] for s in SPLITS}
  sentences: dict[str, None] = {}  # insertion-ordered set
  for topic in sorted(topics):
    for block in re.split(r"\n[ \t]*\n", topics[topic].strip("\n")):
      if not block.strip():
        continue
      body = block.split("\n", 1)[1] if is_definition(block) else block  # drop a term line
      paragraph = prose_text(body) if is_prose(body) else None
      split = block_split(paragraph or block)  # equal paragraphs land in one split
      blocks[split].append(block)
      if paragraph is not None:
        paragraphs[split].append(paragraph)
        for s in _SENTENCE_END.split(paragraph):
          if 3 <= len(s.split()) <= 80:
            sentences.setdefault(s)
  ordered = sorted(sentences, key=lambda s: (_hash(s), s))
  n_h, n_c = N_HELDOUT_SENTENCES, N_CALIBRATION_SENTENCES
  if len(ordered) < n_h + n_c + 100:
    raise ValueError(f"only {len(ordered)} sentences; need {n_h + n_c + 100}")
  sentence_splits = {"heldout": ordered[:n_h], "calibration": ordered[n_h:n_h + n_c],
                     "test": ordered[n_h + n_c:]}
  return {
      "source": "CPython pydoc_data.topics (the Python documentation's topic help)",
      "license": "Copyright Python Software Foundation; PSF License Agreement",
      "python_version": ".".join(map(str, sys.version_info[:3])),
      "blocks": blocks,
      "paragraphs": paragraphs,
      "sentences": {s: sentence_splits[s] for s in SPLITS},
  }


def main() -> None:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  corpus = build(topics.topics)
  raw = json.dumps(corpus, ensure_ascii=False, sort_keys=True, indent=0).encode("utf-8")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pydoc_corpus.json.gz")
  with open(path, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
    g.write(raw)
  print(f"wrote {path}: {len(raw)} bytes of JSON, sha256 {hashlib.sha256(raw).hexdigest()}")
  for key in ("blocks", "paragraphs", "sentences"):
    print(key, {s: len(v) for s, v in corpus[key].items()})


if __name__ == "__main__":
  main()
