"""parse_score: what a judge wrote -> the 1..5 score it gave, or None when it gave none we can trust."""
import pytest
from hypothesis import given, settings, strategies as st

from humpback_jax.method.score_parser import parse_score

REASONING = ("The answer addresses the user's question directly and is well organised. "
             "It could be more concise.")

JUDGE_OUTPUTS = [
    # The format the prompt asks for, and small deviations from it.
    (f"{REASONING}\nScore: 4", 4),
    (f"{REASONING}\n\nScore: 5\n", 5),
    (f"{REASONING}\nScore:4.", 4),
    (f"{REASONING}\nscore: 2", 2),
    (f"{REASONING}\nSCORE: 3", 3),
    (f"{REASONING}\nScore = 1", 1),
    (f"{REASONING}\nscore - 4", 4),
    (f"{REASONING}\nScore: 4/5", 4),
    (f"{REASONING}\nScore: 5 / 5", 5),
    (f"{REASONING}\nScore: 3 out of 5", 3),
    (f"{REASONING}\nScore: [4]", 4),
    (f"{REASONING}\nScore:\n4", 4),
    (f"{REASONING}\nScore (1-5): 2", 2),
    (f"{REASONING}\nFinal score: 5", 5),
    (f"{REASONING}\nRating: 3", 3),
    (f"{REASONING}\nScore: four", 4),
    # Markdown.
    (f"{REASONING}\n**Score:** 5", 5),
    (f"{REASONING}\n**Score: 4**", 4),
    (f"{REASONING}\nScore: **3**", 3),
    (f"### Reasoning\n{REASONING}\n\n### Score: 4", 4),
    (f"{REASONING}\n`Score: 2`", 2),
    # Text after the score.
    (f"{REASONING}\nScore: 4 - a clear answer with minor room for improvement.", 4),
    (f"Score: 3\n\nThe answer reads like an excerpt from a blog post.", 3),
    (f"{REASONING}\nScore: 4\nNote: 1. The answer could cite sources.", 4),
    # Several scores: the last statement decides.
    ("Score: 2\nOn reflection the answer is complete.\nScore: 4", 4),
    ("A score of 5 requires expert knowledge, which this lacks.\nScore: 3", 3),
    ("Score: 3. A score of 5 would need more depth.", 3),
    ("The answer mentions a score: 5 in passing but overall it is weak.\nScore: 2", 2),
    ("Write \"Score: <rating>\" in the last line.\nScore: 4", 4),
    # Other languages.
    ("La réponse est claire et complète.\nNote : 4", 4),
    ("Die Antwort ist hilfreich.\nBewertung: 3", 3),
    ("La respuesta es completa.\nPuntuación: 5", 5),
    ("La risposta è utile.\nPunteggio: 2", 2),
    ("回答很清楚。\n评分：4", 4),
    ("Ответ полный.\nОценка: 5", 5),
    # Other clear forms, used only when there is no score statement.
    (f"{REASONING}\n4", 4),
    (f"{REASONING}\n**5**", 5),
    (f"{REASONING}\n4/5", 4),
    (f"{REASONING} I would rate this a 4.", 4),
    (f"{REASONING} Overall, 3 out of 5.", 3),
    (f"{REASONING} I'd give it a 5.", 5),
    # Hypotheticals: a score the answer would get under other conditions is not the verdict.
    ("A score of 5 would require more depth, so I would rate it a 3.", 3),
    ("A score of 5 would need worked examples.\n4", 4),
    ("To earn a 5, the answer would have to cite sources. I'd give it a 4.", 4),
    ("To get a perfect 5 it should be shorter. Overall, 4 out of 5.", 4),
    ("I would rate it a 5 if it explained the second step. As written, Score: 4", 4),
    ("I would rate it a 5 if it explained the second step.\n3", 3),
    ("Had it covered errors, a score of 5 could apply. It is a 4.", 4),
    ("A score of 4 is given when the answer is complete.\nThis one is missing a step.\n2", 2),
    ("A score of 5 is not warranted: the tone is impersonal but the list is incomplete.\n2", 2),
    ("Score: 5 would be too generous here.\nScore: 3", 3),
    # Comparisons and negations: a score named to say the answer is not it.
    ("It falls short of a score of 5.\n\n3", 3),
    ("It falls short of a score of 5 because of the closing advertisement.\nI rate it 2.", 2),
    ("Compared to a score of 4 answer, this one is weaker.\nI rate it 2.", 2),
    ("This is better than a score of 2 but not a 5.\n3", 3),
    ("It does not deserve a score of 5; it deserves a 4.", 4),
    ("I would not rate it a 5; it is a 4.", 4),
    ("I wouldn't give it a 5. I'd give it a 3.", 3),
    ("The answer sits closer to a score of 3 than a score of 4, so 3/5.", 3),
    ("This is between a score of 2 and a score of 3.\nScore: 2", 2),
    ("Unlike a score of 5 response, it has a personal anecdote. It deserves a 3.", 3),
    ("Instead of a score of 4, I'd call it a 2.", 2),
    # Rubric quotes: the judge restating the scale is not its verdict.
    ("A score of 4 means the answer is written from an AI assistant's perspective. This is a blog post.\n3", 3),
    ("According to the rubric, a score of 5 indicates a perfect answer from an AI Assistant.\nThis answer repeats the question.\n1", 1),
    ("The rubric reserves \"a score of 5\" for perfect answers, and this is not one.\n4", 4),
    ("The scale says a score of 3 describes blog-style answers, which fits here.\nI rate this a 3.", 3),
    ("5: It means it is a perfect answer from an AI Assistant.\nThe answer is vague.\n2", 2),
    ("A score of 1 applies when the list does not start from the beginning, as here.\n1", 1),
    # Plain verdict phrases, used when no score statement exists.
    (f"{REASONING} It deserves a 4.", 4),
    (f"{REASONING} All told, this is a 5.", 5),
    (f"{REASONING} I'd call it a 3.", 3),
    ("I'd like to give it a 4.", 4),
    # Statements stay verdicts when quoted whole, or when the same line goes on about the answer.
    (f"{REASONING}\n\"Score: 4\"", 4),
    ("Score: 4, a score that reflects minor room for improvement.", 4),
    ("The answer is helpful, so a score of 4 is appropriate.", 4),
    # Hypotheticals with no verdict left: no score, rather than the wrong one.
    ("A score of 5 would require more depth.", None),
    ("To earn a 5 the answer needs examples.", None),
    # Off the 1..5 scale, or not a whole number: the judge did not answer the question asked.
    (f"{REASONING}\nScore: 0", None),
    (f"{REASONING}\nScore: 6", None),
    (f"{REASONING}\nScore: 10", None),
    (f"{REASONING}\nScore: 8/10", None),
    (f"{REASONING}\nScore: 4.5", None),
    (f"{REASONING}\nScore: -1", None),
    (f"{REASONING}\nScore: 45", None),
    ("Score: 4\nOn a 10-point scale:\nScore: 9", None),
    # Hedged between two scores.
    (f"{REASONING}\nScore: 4-5", None),
    (f"{REASONING}\nScore: 3 or 4", None),
    # No score at all.
    ("", None),
    ("   \n\n  ", None),
    (REASONING, None),
    (f"{REASONING}\nScore: <rating>", None),
    ("The list has 3 items and covers 2 topics.", None),
    ("Note: the answer has 5 paragraphs and is well written.", None),
    # What SmolLM2-135M writes when it does not judge (bench/RESULTS.md): a numbered list cut off
    # at the next item's number, or arithmetic, is not a verdict.
    ("1. It addresses most of the asks.\n2. It is well organized.\n3. It is complete and self-contained.\n4", None),
    ("1. Blot up the wine.\n2. Pour cold water on the stain.\n3. Mix washing-up liquid and vinegar.\n4.", None),
    ("To determine which is bigger, 3/8 or 2/5, we need to compare the two fractions.", None),
    # A verdict after a list of reasons is still the verdict.
    ("1. It is helpful.\n2. It is clear.\n\n5", 5),
    ("1. It is helpful.\n2. It quotes a forum.\nSo 2/5.", 2),
]


@pytest.mark.parametrize("judge_output, expected", JUDGE_OUTPUTS)
def test_parse_score_reads_judge_outputs(judge_output, expected):
  assert parse_score(judge_output) == expected


def test_non_string_input_gives_none():
  assert parse_score(None) is None


@settings(max_examples=200)
@given(st.text())
def test_parse_score_never_raises_and_stays_on_scale(text):
  assert parse_score(text) in (None, 1, 2, 3, 4, 5)


@settings(max_examples=200)
@given(st.text(), st.integers(min_value=1, max_value=5))
def test_a_final_score_line_wins_over_any_text_before_it(reasoning, score):
  assert parse_score(f"{reasoning}\nScore: {score}") == score
