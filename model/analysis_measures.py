"""What a reasoning-mode analysis is, measured: its length without the words the prompt puts in the
model's mouth, whether it only copies the query, whether it opens with the closing phrase, whether it is
empty or ran into the length cap.

Why: a length alone is met by template text. A model told to "finish with: The embedding is
<|embed_token|>" can fill a length condition with "The embedding of X is ..." or with the query copied
back, which analyse nothing; these measures say how much of what it wrote is its own (used by the
length condition of Stage 2, its telemetry, and every reasoning row of ``search-r3 test``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from search_r3.model.prompts import PromptTemplates

COPY_THRESHOLD = 0.8  # an analysis copies the query when this share of its words occurs in the query
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class AnalysisMeasures:
    tokens: int  # tokens of the analysis once every template phrase is removed (0: none of its own)
    copies_query: bool  # at least COPY_THRESHOLD of its words occur in the query
    begins_with_closing: bool  # it opens with the closing phrase's first words ("The embedding ...")
    capped: bool  # generation hit the length cap before the embed token or an end of turn

    @property
    def empty(self) -> bool:
        return self.tokens == 0


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    words = phrase.split()
    return re.compile(r"\b" + r"\s+".join(map(re.escape, words)) + r"\b", re.IGNORECASE)


def strip_templates(text: str, prompts: PromptTemplates) -> str:
    """``text`` without any occurrence of the closing phrase ("The embedding is", any case or spacing)
    and without the embed token: what is left is the model's own analysis."""
    text = text.replace(prompts.embed_token, " ")
    if prompts.closing_words:
        text = _phrase_pattern(prompts.closing_words).sub(" ", text)
    return " ".join(text.split())


def strip_closing_tail(text: str, prompts: PromptTemplates) -> str:
    """``text`` less a closing phrase at its end (with any punctuation after it): the analysis as written."""
    text = text.replace(prompts.embed_token, "").rstrip()
    if prompts.closing_words:
        words = prompts.closing_words.split()
        tail = re.compile(r"\s*\b" + r"\s+".join(map(re.escape, words)) + r"\W*$", re.IGNORECASE)
        text = tail.sub("", text)
    return text.strip()


def measure_analysis(text: str, query: str, count_tokens: Callable[[str], int], prompts: PromptTemplates,
                     capped: bool, threshold: float = COPY_THRESHOLD) -> AnalysisMeasures:
    """The measures of one analysis ``text`` (what the model wrote before its embed token) for ``query``."""
    own = strip_templates(text, prompts)
    words = _WORD.findall(own.casefold())
    query_words = set(_WORD.findall(query.casefold()))
    copies = bool(words) and sum(w in query_words for w in words) / len(words) >= threshold
    opener = " ".join(prompts.closing_words.split()[:2])
    begins = bool(opener) and _phrase_pattern(opener).match(text.strip()) is not None
    return AnalysisMeasures(count_tokens(own) if own else 0, copies, begins, capped)


def analysis_rates(measures: Sequence[AnalysisMeasures]) -> dict[str, float]:
    """Shares over a set of analyses: empty, copying the query, opening with the closing phrase, capped."""
    n = len(measures)
    if not n:
        return {}
    return {"empty_analysis_rate": round(sum(m.empty for m in measures) / n, 4),
            "copies_query_rate": round(sum(m.copies_query for m in measures) / n, 4),
            "begins_with_closing_rate": round(sum(m.begins_with_closing for m in measures) / n, 4),
            "capped_rate": round(sum(m.capped for m in measures) / n, 4)}
