"""A small English text corpus that ships with Python itself: ``pydoc_data.topics``.

The interpreter's ``help()`` topics (about 80 topics, ~0.5 MB of text) are split into
sentences deterministically, so benchmarks and quality metrics get real text without any
download.  The text depends on the Python minor version that provides ``pydoc_data``; on one
interpreter every function here returns the same result on every call.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from icd_jax.errors import ConfigError

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WHITESPACE = re.compile(r"\s+")
_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")
_NO_BREAK_AFTER = re.compile(r"^(\(?\d+\.|\(?[a-z]\.|e\.g\.|i\.e\.|etc\.|vs\.|cf\.)$")


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def topic_names() -> list[str]:
    """Every help-topic name, sorted; a label ``k`` refers to ``topic_names()[k]``."""
    return sorted(_topics())


def _keep(piece: str, min_chars: int) -> bool:
    return len(piece) >= max(min_chars, 1) and any(ch.isalnum() for ch in piece)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _prose_sentences(prose: str) -> list[str]:
    """Split prose on sentence ends, re-joining list markers ("1.") and abbreviations."""
    out: list[str] = []
    carry = ""
    for part in _SENTENCE_END.split(prose):
        part = f"{carry} {part}".strip() if carry else part.strip()
        last = part.rsplit(" ", 1)[-1].lower()
        carry = part if _NO_BREAK_AFTER.match(last) else ""
        if not carry:
            out.append(part)
    if carry:
        out.append(carry)
    return out


def _split_text(text: str) -> list[str]:
    """Pieces of one topic's text, in order, whitespace collapsed, junk not yet dropped.

    Prose paragraphs are joined and split on sentence ends; an indented paragraph after one
    that ends with ":" (a code or grammar block in the help text) gives one piece per line.
    """
    pieces: list[str] = []
    prev_colon = False
    prev_indent = 0
    for paragraph in _PARAGRAPH_BREAK.split(text):
        lines = [line for line in paragraph.split("\n") if line.strip()]
        lines = [line for line in lines if not _UNDERLINE.match(line)]
        if not lines:
            continue
        indent = min(_indent(line) for line in lines)
        is_code = (prev_colon and indent > prev_indent) or any(
            line.lstrip().startswith(">>>") or "::=" in line for line in lines
        )
        if is_code:
            pieces.extend(_WHITESPACE.sub(" ", line).strip() for line in lines)
            continue
        prose = _WHITESPACE.sub(" ", " ".join(lines)).strip()
        pieces.extend(_prose_sentences(prose))
        prev_colon = prose.endswith(":")
        prev_indent = indent
    return pieces


@functools.lru_cache(maxsize=4)
def _split_all(min_chars: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    texts: list[str] = []
    labels: list[int] = []
    topics = _topics()
    for label, name in enumerate(sorted(topics)):
        for piece in _split_text(topics[name]):
            if _keep(piece, min_chars):
                texts.append(piece)
                labels.append(label)
    return tuple(texts), tuple(labels)


def sentences(n: int | None = None, *, min_chars: int = 1) -> list[str]:
    """The first ``n`` corpus sentences (all when ``None``), topics in sorted order.

    Each piece is a prose sentence or one line of an indented code/grammar block, with runs of
    whitespace collapsed to one space; pieces shorter than ``min_chars`` characters or without a
    letter or digit are dropped.  Non-ASCII text is kept as is.  Raises ``ConfigError`` when
    ``n`` exceeds the number of sentences there are.
    """
    if n is not None and n < 0:
        raise ConfigError(f"n must be non-negative or None, got {n}")
    texts, _ = _split_all(int(min_chars))
    if n is None:
        return list(texts)
    if n > len(texts):
        raise ConfigError(
            f"n={n} exceeds the {len(texts)} corpus sentences with min_chars={min_chars}"
        )
    return list(texts[:n])


def labelled_sentences(
    min_per_topic: int = 2,
    *,
    min_chars: int = 1,
    max_per_topic: int | None = None,
    unique: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Sentences and their topic labels, for topic-retrieval quality metrics.

    Returns ``(texts, labels)`` with ``labels`` int32 ``[len(texts)]``; ``labels[i]`` indexes
    ``topic_names()``.  With ``unique`` a sentence text that occurs more than once anywhere in
    the corpus is dropped (so no neighbour is an exact copy), then each topic keeps at most
    ``max_per_topic`` sentences (its first ones), and topics left with fewer than
    ``min_per_topic`` sentences are dropped whole.  Order: topics sorted, then text order.
    """
    if min_per_topic < 1:
        raise ConfigError(f"min_per_topic must be >= 1, got {min_per_topic}")
    if max_per_topic is not None and max_per_topic < min_per_topic:
        raise ConfigError(
            f"max_per_topic={max_per_topic} is below min_per_topic={min_per_topic}"
        )
    texts, labels = _split_all(int(min_chars))
    counts: dict[str, int] = {}
    for text in texts:
        counts[text] = counts.get(text, 0) + 1
    by_topic: dict[int, list[str]] = {}
    for text, label in zip(texts, labels):
        if unique and counts[text] > 1:
            continue
        kept = by_topic.setdefault(label, [])
        if max_per_topic is None or len(kept) < max_per_topic:
            kept.append(text)
    out_texts: list[str] = []
    out_labels: list[int] = []
    for label in sorted(by_topic):
        kept = by_topic[label]
        if len(kept) >= min_per_topic:
            out_texts.extend(kept)
            out_labels.extend([label] * len(kept))
    return out_texts, np.asarray(out_labels, dtype=np.int32)
