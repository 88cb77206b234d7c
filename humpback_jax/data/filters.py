"""Segment filters (METHOD.md's later report): each returns its name when it drops a segment.

Header filters look at the header alone, so segmentation can also leave a failing sub-section
out of the segments that enclose it; content filters look at the text.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from humpback_jax.data.segment import Segment, normalise

# Navigation/boilerplate headers. Phrases match as whole words anywhere in the header; the
# words match only the whole header (ignoring case, punctuation and counts: "Comments (12)"),
# because alone they are also ordinary topics ("Binary search", "tar archives").
NAVIGATION_PHRASES = (
    "advertisement", "advertisements", "quick link", "quick links", "related posts",
    "related articles", "share this", "cookie policy", "cookie settings", "contact us", "sponsored",
    "table of contents", "previous topic", "next topic", "quick search", "skip to content",
    "follow us", "leave a reply", "leave a comment", "recent posts", "popular posts",
    "recent comments", "you may also like", "privacy policy", "terms of use", "terms of service",
    "all rights reserved", "site map", "sitemap", "report a bug", "show source",
)
NAVIGATION_HEADERS = (
    "forum", "forums", "menu", "main menu", "navigation", "comments", "comment", "subscribe",
    "cookie", "cookies", "sign in", "sign up", "log in", "login", "register", "privacy",
    "copyright", "tags", "categories", "category", "archive", "archives", "search", "contents",
    "related", "links", "share", "home", "about", "about us", "footer", "sidebar", "previous",
    "next", "this page", "more", "newsletter", "social", "contact", "downloads",
)


def filter_empty_header(segment: Segment) -> str | None:
  """"empty_header" when an HTML header has no text."""
  return "empty_header" if segment.header is not None and not segment.header.strip() else None


def filter_navigation_header(segment: Segment, phrases=NAVIGATION_PHRASES,
                             headers=NAVIGATION_HEADERS) -> str | None:
  """"navigation_header" when the header contains a navigation phrase or is a navigation word."""
  if not segment.header:
    return None
  words = " ".join(re.findall(r"[^\W\d_]+", segment.header.lower()))
  if words in headers or any(re.search(rf"\b{re.escape(p)}\b", words) for p in phrases):
    return "navigation_header"
  return None


def filter_all_caps_header(segment: Segment) -> str | None:
  """"all_caps_header" when the header has two or more cased letters, all upper case."""
  cased = _cased_letters(segment.header)
  return "all_caps_header" if len(cased) >= 2 and all(c.isupper() for c in cased) else None


def filter_header_capital_share(segment: Segment, max_share: float = 0.5) -> str | None:
  """"header_capital_share" when more than `max_share` of the header's cased letters are upper."""
  cased = _cased_letters(segment.header)
  if not cased:
    return None
  share = sum(c.isupper() for c in cased) / len(cased)
  return "header_capital_share" if share > max_share else None


def _cased_letters(header: str | None) -> list[str]:
  return [c for c in header or "" if c.isupper() or c.islower()]


def filter_length(segment: Segment, min_chars: int = 600, max_chars: int = 3000) -> str | None:
  """"length" when the segment text is shorter than `min_chars` or longer than `max_chars`."""
  return None if min_chars <= len(segment.text) <= max_chars else "length"


_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")


def filter_repeated_sentences(segment: Segment, max_share: float = 0.0, min_chars: int = 20) -> str | None:
  """"repeated_sentences" when more than `max_share` of the sentences repeat an earlier one.

  A sentence is a piece of a line ending in . ! or ? and of `min_chars` or more, compared
  ignoring case and spacing; lines of code or lists without an end mark do not count.
  """
  pieces = (normalise(p).lower() for p in re.split(r"(?<=[.!?])\s+|\n", segment.text))
  sentences = [p for p in pieces if len(p) >= min_chars and _SENTENCE_END.search(p)]
  if not sentences:
    return None
  repeated = 1 - len(set(sentences)) / len(sentences)
  return "repeated_sentences" if repeated > max_share else None


def filters_from_config(cfg: Mapping) -> tuple[tuple[str, Callable[[Segment], str | None]], ...]:
  """The filters in the order prepare_corpus applies them, bound to `cfg`'s values."""
  return (
      ("empty_header", filter_empty_header),
      ("navigation_header", lambda s: filter_navigation_header(
          s, tuple(cfg["navigation_phrases"]), tuple(cfg["navigation_headers"]))),
      ("all_caps_header", filter_all_caps_header),
      ("header_capital_share", lambda s: filter_header_capital_share(s, cfg["header_capital_share"])),
      ("length", lambda s: filter_length(s, cfg["min_chars"], cfg["max_chars"])),
      ("repeated_sentences", lambda s: filter_repeated_sentences(
          s, cfg["max_repeated_sentence_share"], cfg["min_sentence_chars"])),
  )


HEADER_FILTERS = ("empty_header", "navigation_header", "all_caps_header", "header_capital_share")


def header_check_from_config(cfg: Mapping) -> Callable[[str], str | None]:
  """header text -> the first header filter it fails (None: it passes), bound to `cfg`'s values."""
  header_filters = [f for name, f in filters_from_config(cfg) if name in HEADER_FILTERS]

  def check(header: str) -> str | None:
    probe = Segment(id="", doc_id="", header=header, text="")
    return next((r for r in (f(probe) for f in header_filters) if r is not None), None)

  return check
