"""Reads the 1-5 score out of a judge's free-text answer to the self-curation prompt.

The prompt asks for `Score: <rating>` in the last line; judges, small ones especially, write
`**Score:** 4`, `Score: 4/5`, `Rating - 4`, `Note : 4`, a bare `4` or "I would rate this a 4".
Rules, in order:
1. Score statements: a keyword (`score`, `rating`, or one of KEYWORDS' other languages), an
   optional parenthesis such as "(1-5)", a separator, then a number, optionally "/5" or
   "out of 5". The LAST statement with a punctuation separator (`:`, `=`, `-`) decides; only
   without one, the last with a word separator or none ("is", "of": "a score of 5 needs ...").
2. Only when there is none: the last of a final line holding only a number ("4", "4/5", "**4**"),
   "N out of 5" / "N/5" anywhere, "rate ... N" / "give it a N", or "it is / deserves a N." ending
   a sentence.
A bare final line that is the next number of a numbered list ("3. ...\n4.") is the list cut off,
and "N/5" on a line with a fraction of another denominator ("3/8 or 2/5") is arithmetic: neither
is a verdict.
A mention is not a verdict, and is passed over by both rules, when the words around it make it a
hypothetical ("a score of 5 would require ...", "to earn a 5", "rate it a 5 if ..."), a comparison
or negation ("falls short of a score of 5", "better than a 3", "not a 5") or a rubric quote ("a
score of 4 means ...", a number inside quotes that the sentence goes on past). So the final verdict
wins over every passing mention, whichever comes last.
The deciding statement must be an integer 1..5 with no denominator or denominator 5; anything
else (0, 6, 10, 4.5, 8/10, "4-5", "4 or 5") gives None: we never round or rescale, because a
judge that left the scale did not answer the question asked. No score at all gives None.
"""
from __future__ import annotations

import re

# Score keywords by language; lowercase, matched case-insensitively on word boundaries.
KEYWORDS = {
    "en": ("score", "scores", "rating", "final rating", "grade"),
    "fr": ("note", "évaluation", "evaluation"),
    "de": ("bewertung", "punktzahl", "note"),
    "es": ("puntuación", "puntuacion", "puntaje", "calificación", "calificacion", "nota"),
    "it": ("punteggio", "voto", "valutazione"),
    "pt": ("pontuação", "pontuacao", "nota", "avaliação", "avaliacao"),
    "ru": ("оценка", "балл"),
}
# Scripts without spaces between words: matched without word boundaries.
CJK_KEYWORDS = ("评分", "分数", "得分", "スコア", "評価", "点数", "점수", "평가")
# Keywords that are also ordinary words ("Note: 1. The answer ..."): a number after them counts
# only when it ends the line.
LINE_END_ONLY = frozenset({"note", "nota", "voto", "grade"})

_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_MIN_SCORE, _MAX_SCORE = 1, 5

_WORD_KEYWORDS = sorted({k for words in KEYWORDS.values() for k in words}, key=len, reverse=True)
_KEYWORD = (r"(?:(?<![^\W\d_])(?P<kw>" + "|".join(map(re.escape, _WORD_KEYWORDS)) + r")(?![^\W\d_])"
            r"|(?P<cjk>" + "|".join(map(re.escape, CJK_KEYWORDS)) + r"))")
# A signed integer or decimal, or a number word; sign and decimals are captured to reject them,
# and the lookahead keeps "45" or "4.5" from being read as 4.
_NUMBER = r"[-+−]?\d+(?:[.,]\d+)?|(?:" + "|".join(_NUMBER_WORDS) + r")\b"
_VALUE = r"(?P<value>" + _NUMBER + r")(?![\w.,]*\d)"
_DENOMINATOR = (r"(?:[ \t]*(?:/|\(?[ \t]*out[ \t]+of\b|\b(?:sur|von|de|su|из)\b)[ \t]*(?P<den>\d+)"
                r"(?![\d/])\)?)?")
# "4-5", "4 to 5", "4 or 5": the judge hedged.
_HEDGE = r"(?P<hedge>[ \t]*(?:[-–—]|\b(?:to|or|ou|oder|o)\b)[ \t]*\d)?"
# Punctuation separators make a strong statement ("Score: 4"); words make a weak one
# ("a score of 5 would need ..."), which decides only when no strong one exists.
_SEPARATOR = (r"[ \t]*(?:\([^()\n]{0,30}\)[ \t]*)?"
              r"(?:(?P<strong>[:：=\-–—])|\b(?:is|of|would\s+be|will\s+be|est|ist|es|è|é)\b)?")
_GAP = r"[ \t]*\n?[ \t]*[\[(<]{0,2}[ \t]*"

_STATEMENT = re.compile(_KEYWORD + _SEPARATOR + _GAP + _VALUE + _DENOMINATOR + _HEDGE, re.IGNORECASE)
_BARE_LINE = re.compile(r"^[\s\[(<]*" + _VALUE + _DENOMINATOR + r"[\s\])>.!]*$", re.IGNORECASE)
_OUT_OF_FIVE = re.compile(r"(?<![\w.,/])(?P<value>" + _NUMBER + r")[ \t]*(?:/|\(?[ \t]*out[ \t]+of)"
                          r"[ \t]*(?P<den>5)(?![\d/])", re.IGNORECASE)
_RATE_PHRASE = re.compile(r"\brated?\b[^\n\d]{0,30}?[\[(]?" + _VALUE + _DENOMINATOR, re.IGNORECASE)
_GIVE_PHRASE = re.compile(r"\bgive\b[^\n\d]{0,30}?\b(?:a|an)[ \t]+[\[(]?" + _VALUE + _DENOMINATOR,
                          re.IGNORECASE)
_VERDICT_PHRASE = re.compile(r"\b(?:is|deserves?|merits?|earns?|warrants?|call[ \t]+it)[ \t]+(?:a|an)[ \t]+"
                             r"(?:(?:solid|clear|strong|fair)[ \t]+)?" + _VALUE + _DENOMINATOR
                             + r"(?=[ \t]*(?:[.!;)\n]|$))", re.IGNORECASE)
_MARKUP = re.compile(r"[*_`~]+")
_LIST_ITEM = re.compile(r"^[ \t]*(?P<n>\d+)[.)][ \t]")
_OTHER_FRACTION = re.compile(r"\d[ \t]*/[ \t]*(?!5(?!\d))\d")

# Words before a mention that make it a comparison, a negation or a condition, not the verdict:
# "short of a score of 5", "better than a 3", "does not deserve a 5", "to earn a perfect 5".
_NOT_VERDICT_BEFORE = re.compile(
    r"(?:\bshort[ \t]+of|\bthan|\bto[ \t]+(?:get|earn|deserve|reach|achieve|receive|merit|justify|warrant)"
    r"|\bnot|n't|\bnever|\bbetween|\binstead[ \t]+of|\bunlike|\bif|\bwhether|\bbeyond|\btowards?"
    r"|\bcloser[ \t]+to|\bcompared[ \t]+(?:to|with)|\bas[ \t]+good[ \t]+as|\bfor[ \t]+(?:a|an)[ \t]+(?:full|perfect|top|higher|maximum))"
    r"(?:[ \t]+[^\W\d_]+){0,2}?[ \t]+(?:(?:a|an|the)[ \t]+)?"
    r"(?:(?:full|perfect|top|higher|lower|maximum|max)[ \t]+)?$", re.IGNORECASE)
# Words after a mention that make it a hypothetical or a rubric definition: "a score of 5 would
# require ...", "a score of 4 means ...", "rate it a 5 if ...".
_NOT_VERDICT_AFTER = re.compile(
    r"^[ \t]*[)\]]?[ \t]*,?[ \t]*(?:would|could|should|might|requires?|required|needs?|needed|demands?"
    r"|means|meant|indicates|implies|describes|represents|signifies|calls[ \t]+for|applies|if|unless"
    r"|is[ \t]+(?:for|reserved|meant|given[ \t]+(?:to|for|when)|only|not|too|when|unwarranted)"
    r"|isn't|are[ \t]+(?:for|reserved|given)|goes[ \t]+to|fits[ \t]+answers|answers?|responses?|level)\b", re.IGNORECASE)
_QUOTED = re.compile(r"[\"“][^\"“”\n]*[\"”]")


def parse_score(text: str) -> int | None:
  """The judge's 1..5 score, or None when absent, out of range or ambiguous; never raises.

  See the module docstring for the rules, applied in order.
  """
  if not isinstance(text, str):
    return None
  text = _MARKUP.sub("", text)
  statement = _last_statement(text)
  if statement is not None:
    return _score_of(statement)
  fallback = _last_fallback(text)
  return _score_of(fallback) if fallback is not None else None


def _last_statement(text: str) -> re.Match | None:
  """The last strong score statement that is a verdict, else the last weak one, else None."""
  last = {True: None, False: None}
  for match in _STATEMENT.finditer(text):
    keyword = (match.group("kw") or "").lower()
    if keyword in LINE_END_ONLY and not _ends_line(text, match.end()):
      continue
    if _is_verdict(text, match):
      last[match.group("strong") is not None] = match
  return last[True] or last[False]


def _last_fallback(text: str) -> re.Match | None:
  """The last rule-2 form in the text that is a verdict: a bare final line, "N out of 5",
  "rate ... N", "give it a N" or "it is a N."."""
  lines = [line for line in text.splitlines() if line.strip()]
  bare = _BARE_LINE.match(lines[-1]) if lines else None
  if bare is not None and not _continues_list(lines, bare):
    return bare  # the final line is the last thing the judge wrote
  phrases = [m for p in (_OUT_OF_FIVE, _RATE_PHRASE, _GIVE_PHRASE, _VERDICT_PHRASE) for m in p.finditer(text)
             if _is_verdict(text, m) and not (p is _OUT_OF_FIVE and _among_fractions(text, m))]
  return max(phrases, key=lambda m: m.start(), default=None)


def _continues_list(lines: list[str], bare: re.Match) -> bool:
  """True when the bare final number is the next item number of the list on the line before."""
  item = _LIST_ITEM.match(lines[-2]) if len(lines) > 1 else None
  value = bare.group("value")
  return item is not None and value.isdigit() and int(item.group("n")) + 1 == int(value)


def _among_fractions(text: str, match: re.Match) -> bool:
  """True when the line of an "N/5" also holds a fraction of another denominator: arithmetic."""
  line_start = text.rfind("\n", 0, match.start()) + 1
  line_end = len(text) if (end := text.find("\n", match.end())) < 0 else end
  return _OTHER_FRACTION.search(text, line_start, line_end) is not None


def _is_verdict(text: str, match: re.Match) -> bool:
  """False when the words around `match` make it a hypothetical, a comparison or a rubric quote."""
  line_start = text.rfind("\n", 0, match.start()) + 1
  line_end = len(text) if (end := text.find("\n", match.end())) < 0 else end
  if _NOT_VERDICT_BEFORE.search(text[line_start:match.start()]):
    return False
  if _NOT_VERDICT_AFTER.search(text[match.end():line_end]):
    return False
  for quote in _QUOTED.finditer(text, line_start, line_end):
    # Inside quotes that the sentence goes on past: a phrase cited, not the judge's own line.
    if quote.start() <= match.start() and match.end() <= quote.end():
      return not re.search(r"[^\W_]", text[quote.end():line_end])
  return True


def _ends_line(text: str, position: int) -> bool:
  rest = text[position:].split("\n", 1)[0]
  return not rest.strip(" \t.!)]>")


def _score_of(match: re.Match) -> int | None:
  """The statement's score if it is a whole number in 1..5 out of 5, else None."""
  groups = match.groupdict()
  if groups.get("hedge"):
    return None
  if groups.get("den") is not None and groups["den"] != "5":
    return None
  value = groups["value"].lower()
  if value in _NUMBER_WORDS:
    score = _NUMBER_WORDS[value]
  elif not value.isdigit():
    return None  # signed or decimal
  else:
    score = int(value)
  return score if _MIN_SCORE <= score <= _MAX_SCORE else None
