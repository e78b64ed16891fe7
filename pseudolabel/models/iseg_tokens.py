"""Which tokens of a class name carry the class in iSeg's prompt (pure; tokenizer only).

The iSeg reference reads one class's cross-attention as the mean over a chosen subset of its name's
tokens: for "traffic light" only "light", for "potted plant" only "plant", for most names all of them
(its COCO-80 and VOC-20 name tables). ``REFERENCE_WORDS`` holds those choices as words; a job can
override or extend them per ontology category or prompt with ``tokens`` (word or words of the prompt).

Words, not token offsets: the reference stores offsets that assume one token per word, which the real
CLIP tokenizer does not always give; a chosen word contributes every token it is split into.
"""
from __future__ import annotations

#: the reference's name tables (COCO-80, VOC-20): multi-word names whose class tokens are a subset of
#: their words; every other name uses all its tokens
REFERENCE_WORDS: dict[str, list[str]] = {
    "traffic light": ["light"],
    "fire hydrant": ["hydrant"],
    "baseball bat": ["bat"],
    "baseball glove": ["glove"],
    "tennis racket": ["racket"],
    "wine glass": ["glass"],
    "potted plant": ["plant"],
    "tv monitor": ["monitor"],
}


def n_tokens(tokenizer, text: str) -> int:
    """Number of tokens of ``text`` without the start/end tokens."""
    return len(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else 0


def word_token_offsets(tokenizer, phrase: str, words: list[str] | None) -> list[int] | None:
    """Offsets (within ``phrase``'s tokens) of the tokens of the whitespace-separated ``words`` of it.

    None or an empty list means every token (returns None). Words are matched case-insensitively; a
    word that occurs several times is taken at each place. Raises ValueError when none of ``words``
    is a word of ``phrase``.

    Example with one token per word: ``word_token_offsets(tok, "traffic light", ["light"]) == [1]``.
    """
    if not words:
        return None
    wanted = {w.strip().lower() for w in words}
    parts = phrase.split()
    out: list[int] = []
    start = 0
    for i, part in enumerate(parts):
        # CLIP's tokenizer never merges across whitespace, so a word's tokens follow its predecessors'
        end = n_tokens(tokenizer, " ".join(parts[: i + 1]))
        if part.lower() in wanted:
            out.extend(range(start, end))
        start = end
    if not out:
        raise ValueError(f"none of the words {sorted(wanted)} is a word of the prompt {phrase!r}")
    return out


def class_words(category: str, phrases: list[str], overrides: dict[str, "str | list[str]"],
                table: dict[str, list[str]] = REFERENCE_WORDS) -> list[list[str] | None]:
    """Per prompt phrase of one ontology entry: the words whose tokens carry the class (None = all).

    Order of precedence: ``overrides[phrase]``, ``overrides[category]``, ``table[phrase]`` (matched
    lowercase), else all tokens. An override given for the category applies to the phrases that
    contain one of its words and leaves the others whole; it must match at least one phrase. A
    prompt-keyed override must name a word of that prompt. Raises ValueError otherwise.
    """
    def as_list(v) -> list[str]:
        return [v] if isinstance(v, str) else list(v)

    by_category = as_list(overrides[category]) if category in overrides else None
    out: list[list[str] | None] = []
    matched = False
    for phrase in phrases:
        words = {w.lower() for w in phrase.split()}
        if phrase in overrides and phrase != category:
            wanted = as_list(overrides[phrase])
            if wanted and not any(w.lower() in words for w in wanted):
                raise ValueError(f"tokens[{phrase!r}]: none of {wanted} is a word of that prompt")
            out.append([w for w in wanted if w.lower() in words] or None)
        elif by_category is not None:
            hit = [w for w in by_category if w.lower() in words]
            out.append(hit or None)
            matched = matched or bool(hit) or not by_category
        else:
            out.append(table.get(phrase.strip().lower()))
    if by_category is not None and not matched:
        raise ValueError(f"tokens[{category!r}]: none of {by_category} is a word of its prompts {phrases}")
    return out
