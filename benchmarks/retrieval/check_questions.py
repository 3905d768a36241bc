#!/usr/bin/env python3
"""Validate the retrieval benchmark in benchmarks/retrieval/.

Checks (any failure -> exit status 1):

Corpus (corpus/*.txt):
  * at least 32 documents, none of them a symlink;
  * every document is named in corpus/README.md (the SOURCES file);
  * python-<topic>.txt files start with the line
    "Python 3.11 language reference: <topic>" followed by a blank line;
    when run under CPython 3.11.2 (the interpreter they were exported
    from) the rest of the file must equal pydoc_data.topics.topics[<topic>]
    (other interpreters ship slightly different text, so this comparison
    is skipped there and a note is printed);
  * the other .txt files must be byte-identical to the same-named file in
    /usr/share/common-licenses/ when that directory has it (skipped, with
    a note, when it does not).

Questions (questions.yaml):
  * a YAML list of mappings with exactly the keys question, doc,
    evidence, kind; kind is "paraphrase" or "keyword";
  * at least 64 questions, exactly half of each kind; no duplicate
    questions; at least 30 distinct docs; at most 3 questions per doc;
  * doc names an existing corpus file;
  * evidence is 3-10 whitespace-separated words and, after collapsing
    every whitespace run (newlines included) to one space in both the
    evidence and the document, is a case-sensitive substring of its doc;
  * the evidence occurs in no other corpus document (same collapsing,
    compared case-insensitively, which is stricter);
  * paraphrase questions share no 3-word sequence with their document:
    both texts are lower-cased, split into [a-z0-9]+ tokens, stop words
    are removed, and the sets of consecutive 3-token sequences must not
    intersect.

Usage: python check_questions.py [path/to/questions.yaml]
Needs only the standard library and PyYAML.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
SYSTEM_LICENSES = Path("/usr/share/common-licenses")
PY_HEADER = "Python 3.11 language reference: {}"
EXPORT_VERSION = (3, 11, 2)

STOP_WORDS = frozenset(
    [
        "the",
        "a",
        "an",
        "of",
        "to",
        "and",
        "in",
        "is",
        "for",
        "my",
        "i",
        "do",
        "does",
        "what",
        "how",
        "can",
        "or",
        "on",
        "it",
        "its",
        "be",
        "are",
        "was",
        "were",
        "been",
        "being",
        "if",
        "that",
        "this",
        "these",
        "those",
        "with",
        "as",
        "by",
        "at",
        "from",
        "into",
        "onto",
        "about",
        "when",
        "which",
        "who",
        "whom",
        "whose",
        "will",
        "would",
        "should",
        "could",
        "there",
        "their",
        "they",
        "them",
        "we",
        "our",
        "you",
        "your",
        "me",
        "am",
        "not",
        "no",
        "any",
        "all",
        "each",
        "so",
        "than",
        "then",
        "such",
        "has",
        "have",
        "had",
        "also",
        "only",
        "just",
        "may",
        "must",
        "shall",
        "s",
        "t",
    ]
)

MIN_DOCS = 32
MIN_QUESTIONS = 64
MIN_FILES_COVERED = 30
MAX_PER_FILE = 3
KINDS = ("paraphrase", "keyword")


def collapse(text: str) -> str:
    return " ".join(text.split())


def tokens(text: str) -> list[str]:
    return [t for t in re.findall(r"[a-z0-9]+", text.lower()) if t not in STOP_WORDS]


def trigrams(text: str) -> set[tuple[str, ...]]:
    t = tokens(text)
    return {tuple(t[i : i + 3]) for i in range(len(t) - 2)}


def main(argv: list[str]) -> int:
    qpath = Path(argv[1]) if len(argv) > 1 else HERE / "questions.yaml"
    failures: list[str] = []
    notes: list[str] = []

    def fail(msg: str) -> None:
        failures.append(msg)

    # ---------------------------------------------------------------- corpus
    paths = sorted(CORPUS.glob("*.txt"))
    raw = {p.name: p.read_text(encoding="utf-8") for p in paths}
    docs = {name: collapse(text) for name, text in raw.items()}
    docs_lower = {name: text.lower() for name, text in docs.items()}
    if len(paths) < MIN_DOCS:
        fail(f"corpus has {len(paths)} documents, need >= {MIN_DOCS}")
    readme = CORPUS / "README.md"
    readme_text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    if not readme_text:
        fail("corpus/README.md (SOURCES) is missing or empty")

    topics = None
    if sys.version_info[:3] == EXPORT_VERSION:
        from pydoc_data.topics import topics  # type: ignore
    else:
        notes.append(
            "python-*.txt bodies not compared with pydoc_data: running "
            f"{sys.version.split()[0]}, exported from " + ".".join(map(str, EXPORT_VERSION))
        )
    missing_system = 0
    for p in paths:
        if p.is_symlink():
            fail(f"{p.name}: is a symlink, expected a real file")
        if p.name not in readme_text:
            fail(f"{p.name}: not listed in corpus/README.md")
        if p.name.startswith("python-"):
            topic = p.name[len("python-") : -len(".txt")]
            head, sep, body = raw[p.name].partition("\n\n")
            if head != PY_HEADER.format(topic) or not sep:
                fail(f"{p.name}: first line must be {PY_HEADER.format(topic)!r} then a blank line")
            elif topics is not None and body != topics.get(topic):
                fail(f"{p.name}: text differs from pydoc_data.topics.topics[{topic!r}]")
        else:
            matches = [s for s in SYSTEM_LICENSES.glob("*") if s.name.lower() + ".txt" == p.name]
            if not matches:
                missing_system += 1
            elif matches[0].read_bytes() != p.read_bytes():
                fail(f"{p.name}: differs from {matches[0]}")
    if missing_system:
        notes.append(f"{missing_system} licence file(s) not compared: no counterpart in {SYSTEM_LICENSES}")

    # ------------------------------------------------------------- questions
    data = yaml.safe_load(qpath.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        fail("questions.yaml must be a YAML list")
        data = []
    kinds: Counter[str] = Counter()
    per_doc: Counter[str] = Counter()
    seen_q: set[str] = set()
    n_evidence_ok = n_unique_ok = n_para = n_para_ok = 0
    for i, item in enumerate(data, 1):
        label = f"q{i}"
        if not isinstance(item, dict) or set(item) != {"question", "doc", "evidence", "kind"}:
            fail(f"{label}: must have exactly the keys question, doc, evidence, kind")
            continue
        q, doc, ev, kind = (str(item[k]) for k in ("question", "doc", "evidence", "kind"))
        label = f"q{i} ({doc})"
        if kind not in KINDS:
            fail(f"{label}: kind {kind!r} not in {KINDS}")
        kinds[kind] += 1
        per_doc[doc] += 1
        if q.strip().lower() in seen_q:
            fail(f"{label}: duplicate question {q!r}")
        seen_q.add(q.strip().lower())
        if doc not in docs:
            fail(f"{label}: doc not in corpus")
            continue
        ev_c = collapse(ev)
        if not 3 <= len(ev_c.split()) <= 10:
            fail(f"{label}: evidence has {len(ev_c.split())} words, need 3-10")
        if ev_c in docs[doc]:
            n_evidence_ok += 1
        else:
            fail(f"{label}: evidence not found verbatim: {ev!r}")
        others = [n for n, t in docs_lower.items() if n != doc and ev_c.lower() in t]
        if others:
            fail(f"{label}: evidence also occurs in {', '.join(others)}")
        else:
            n_unique_ok += 1
        if kind == "paraphrase":
            n_para += 1
            shared = trigrams(q) & trigrams(docs[doc])
            if shared:
                fail(
                    f"{label}: paraphrase shares 3-word sequence(s) with doc: "
                    + "; ".join(" ".join(s) for s in sorted(shared))
                )
            else:
                n_para_ok += 1

    total = len(data)
    if total < MIN_QUESTIONS:
        fail(f"{total} questions, need >= {MIN_QUESTIONS}")
    if kinds["paraphrase"] != kinds["keyword"]:
        fail(f"kinds unbalanced: {dict(kinds)}")
    if len(per_doc) < MIN_FILES_COVERED:
        fail(f"questions cover {len(per_doc)} files, need >= {MIN_FILES_COVERED}")
    for doc, n in sorted(per_doc.items()):
        if n > MAX_PER_FILE:
            fail(f"{doc}: {n} questions, at most {MAX_PER_FILE} allowed")

    print(f"corpus documents: {len(paths)}")
    print(f"questions: {total} (paraphrase {kinds['paraphrase']}, keyword {kinds['keyword']})")
    print(f"files covered: {len(per_doc)} of {len(paths)}; max per file: {max(per_doc.values(), default=0)}")
    print(f"evidence verbatim in its doc: {n_evidence_ok}/{total}")
    print(f"evidence absent from all other docs: {n_unique_ok}/{total}")
    print(f"paraphrase questions with no shared 3-word sequence: {n_para_ok}/{n_para}")
    for n in notes:
        print(f"note: {n}")
    for f in failures:
        print(f"FAIL: {f}")
    print("OK" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
