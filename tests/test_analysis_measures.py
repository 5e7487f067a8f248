"""Analyses measured for what they are: template phrases removed wherever they stand, copies of the
query, openers taken from the closing sentence, empty and capped analyses."""

from __future__ import annotations

from search_r3.model.analysis_measures import analysis_rates, measure_analysis, strip_closing_tail, strip_templates
from search_r3.model.prompts import PromptTemplates

PROMPTS = PromptTemplates()


def words(text: str) -> int:
    return len(text.split())


def test_template_phrases_are_not_analysis_wherever_they_stand() -> None:
    assert strip_templates("The embedding is <|embed_token|>", PROMPTS) == ""
    assert strip_templates("the  Embedding IS x. The embedding is", PROMPTS) == "x."
    m = measure_analysis("The embedding is vitamin D. The embedding is", "vitamin D deficiency", words, PROMPTS, False)
    assert m.tokens == 2 and m.begins_with_closing  # "vitamin D." is all the model wrote of its own


def test_openers_copies_and_real_analyses() -> None:
    query = "Vitamin D deficiency is associated with many diseases"
    opener = measure_analysis("The embedding of vitamin D deficiency is", query, words, PROMPTS, False)
    assert opener.begins_with_closing and not opener.copies_query and opener.tokens == 7  # 4 of its 7 words
    copy = measure_analysis("vitamin D deficiency, many diseases", query, words, PROMPTS, False)
    assert copy.copies_query and not copy.begins_with_closing
    real = measure_analysis("The claim concerns a nutrient and chronic illness in the elderly.", query, words,
                            PROMPTS, True)
    assert not real.copies_query and not real.begins_with_closing and real.capped and not real.empty
    empty = measure_analysis("The embedding is", query, words, PROMPTS, False)
    assert empty.empty and not empty.copies_query
    assert analysis_rates([opener, copy, real, empty]) == {"empty_analysis_rate": 0.25, "copies_query_rate": 0.25,
                                                           "begins_with_closing_rate": 0.5, "capped_rate": 0.25}


def test_the_written_analysis_keeps_its_words_but_not_the_closing_sentence() -> None:
    assert strip_closing_tail("It asks about statins. The embedding is <|embed_token|>", PROMPTS) == "It asks about statins."
    assert strip_closing_tail("The embedding of statins is", PROMPTS) == "The embedding of statins is"


def test_the_model_counts_analysis_tokens_without_template_text(tiny_lm) -> None:
    """Reasoner.analysis_length (the length condition of Stage 2 and every recorded reasoning length)
    counts tokens of the model's own words only."""
    tok = tiny_lm.tokenizer
    ids = tok("The embedding is Hamlet. The embedding is", add_special_tokens=False)["input_ids"]
    assert tiny_lm.reasoner.analysis_length(ids) == len(tok(" Hamlet.", add_special_tokens=False)["input_ids"]) or \
        tiny_lm.reasoner.analysis_length(ids) == len(tok("Hamlet.", add_special_tokens=False)["input_ids"])
    assert tiny_lm.reasoner.analysis_length(tok("The embedding is", add_special_tokens=False)["input_ids"]) == 0
