"""The unlabeled corpus: documents cut into segments, filtered, deduplicated.

Segments (METHOD.md: "the text that follows an HTML header"). Each h1-h6 header opens a segment
that runs to the next header of the same or a higher level, or to the end of the header's
enclosing <section>/<article>/<main>/<body>, whichever comes first; sub-headers and their text
are inside it, the sub-header as its own paragraph. Nested headers therefore give overlapping
segments, each knowing its enclosing one (`parent_id`). `prepare_corpus` keeps the outermost:
a segment that passes every filter is dropped as "nested" when an enclosing segment also passed.
So a 2,000-character h2 section is kept whole, and a 20,000-character h1 chapter, too long
itself, still yields its h2 sections. Text before the first header is in no segment.
Plain text has no headers: `segments_from_text` cuts it into paragraphs, packed chunks or one
segment per document, with `header=None` (header filters then pass).

`prepare_corpus` order: the filters in FILTERS order (each dropped segment is counted once,
under the first filter that drops it), then nested segments, then exact duplicates, then near
duplicates (MinHash + LSH, verified by exact shingle Jaccard). Within each duplicate group the
first segment in input order is kept; deduplication is idempotent. Nesting is settled before
dedup, so a kept section later dropped as a duplicate takes its sub-sections (copies too) with it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import bs4
import numpy as np

from humpback_jax.data.jsonl import read_jsonl
from humpback_jax.errors import ConfigError, DataError

DROP_TAGS = ("script", "style", "nav", "footer", "aside", "form", "noscript", "template", "head",
             "svg", "iframe", "button", "select")
# ARIA landmarks that mean the same as the dropped tags (Sphinx marks its sidebars this way).
DROP_ROLES = ("navigation", "contentinfo", "complementary", "search")
# Permalink anchors that doc generators put inside headers ("Title¶").
PERMALINK_TEXTS = ("¶", "§", "#", "🔗")
SECTIONING_TAGS = ("section", "article", "main", "body")
HEADER_LEVELS = {f"h{level}": level for level in range(1, 7)}
# Everything else is a block: entering or leaving one ends a paragraph.
INLINE_TAGS = frozenset(
    "a abbr acronym b bdi bdo big cite code data del dfn em font i img ins kbd label mark q s samp "
    "small span strike strong sub sup time tt u var wbr".split())
TEXT_SUFFIXES = (".html", ".htm", ".txt", ".jsonl")
TEXT_MODES = ("paragraphs", "chunks", "document")

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

CORPUS_DEFAULTS = dict(
    min_chars=600,                     # later report of the paper: keep 600-3,000 characters
    max_chars=3000,
    header_capital_share=0.5,          # drop when more than this share of cased letters is upper
    max_repeated_sentence_share=0.0,   # 0: any repeated sentence drops the segment
    min_sentence_chars=20,             # shorter "sentences" ("Example:") may repeat freely
    navigation_phrases=NAVIGATION_PHRASES,
    navigation_headers=NAVIGATION_HEADERS,
    near_dup_threshold=0.8,            # Jaccard of word shingles
    shingle_words=5,
    num_perm=128,
    bands=16,                          # LSH: 16 bands x 8 rows
    minhash_seed=0,
)


@dataclasses.dataclass(frozen=True)
class Segment:
  """One candidate response: body text under a header (or a plain-text piece), with provenance."""
  id: str                         # f"{doc_id}#{k}", k counting segments within the document
  doc_id: str
  header: str | None              # None for plain text; "" for an HTML header with no text
  text: str                       # paragraphs joined by "\n\n"
  level: int = 0                  # 1..6 for h1..h6, 0 for plain text
  parent_id: str | None = None    # the enclosing header's segment, for nested headers


# ----------------------------------------------------------------------------- HTML segments


def segments_from_html(html: str | bytes, doc_id: str) -> list[Segment]:
  """Segments of one HTML document; bytes are decoded by the declared or detected charset."""
  soup = bs4.BeautifulSoup(html, "lxml")
  _drop_boilerplate(soup)
  root = soup.body or soup
  blocks, section_end = _blocks(root)
  return _segments_from_blocks(blocks, section_end, doc_id)


def _drop_boilerplate(soup: bs4.BeautifulSoup) -> None:
  for tag in soup.find_all(DROP_TAGS):
    tag.decompose()
  for tag in soup.find_all(attrs={"role": DROP_ROLES}):
    tag.decompose()
  for anchor in soup.find_all("a"):
    if anchor.get_text().strip() in PERMALINK_TEXTS:
      anchor.decompose()


@dataclasses.dataclass(frozen=True)
class _Block:
  text: str
  level: int = 0               # header level, 0 for a paragraph
  container: int | None = None  # id() of a header's enclosing sectioning element


def _blocks(root: bs4.Tag) -> tuple[list[_Block], dict[int, int]]:
  """The document as a flat list of headers and paragraphs, and where each section ends.

  Walks with an explicit stack (real pages nest deeper than Python's recursion limit).
  """
  blocks, section_end, pending = [], {}, []

  def flush():
    text = _normalise("".join(pending))
    pending.clear()
    if text:
      blocks.append(_Block(text))

  stack = [(root, False)]
  while stack:
    node, leaving = stack.pop()
    if leaving:
      flush()
      if node.name in SECTIONING_TAGS:
        section_end[id(node)] = len(blocks)
    elif isinstance(node, bs4.NavigableString):
      if not isinstance(node, bs4.element.PreformattedString):  # comments, CDATA, doctype
        pending.append(str(node))
    elif node.name in HEADER_LEVELS:
      flush()
      container = node.find_parent(SECTIONING_TAGS)
      blocks.append(_Block(_header_text(node), HEADER_LEVELS[node.name],
                           id(container) if container is not None else None))
    elif node.name == "pre":
      flush()
      text = _preformatted(node.get_text())
      if text:
        blocks.append(_Block(text))
    elif node.name == "br":
      flush()
    else:
      if node.name not in INLINE_TAGS:
        flush()
        stack.append((node, True))
      stack.extend((child, False) for child in reversed(node.contents))
  flush()
  return blocks, section_end


def _segments_from_blocks(blocks: list[_Block], section_end: dict[int, int], doc_id: str) -> list[Segment]:
  segments, open_headers = [], []  # open_headers: (level, end, segment id) of enclosing headers
  for i, block in enumerate(blocks):
    if not block.level:
      continue
    end = section_end.get(block.container, len(blocks))
    end = next((j for j in range(i + 1, end) if 0 < blocks[j].level <= block.level), end)
    while open_headers and (open_headers[-1][1] <= i or open_headers[-1][0] >= block.level):
      open_headers.pop()
    segment_id = f"{doc_id}#{len(segments)}"
    segments.append(Segment(
        id=segment_id, doc_id=doc_id, header=block.text,
        text="\n\n".join(b.text for b in blocks[i + 1:end] if b.text),  # empty sub-headers add nothing
        level=block.level, parent_id=open_headers[-1][2] if open_headers else None))
    open_headers.append((block.level, end, segment_id))
  return segments


def _header_text(header: bs4.Tag) -> str:
  return _normalise(header.get_text()).rstrip("¶§").rstrip()


def _normalise(text: str) -> str:
  return " ".join(text.split())


def _preformatted(text: str) -> str:
  """Code keeps its lines and indentation; only trailing spaces and blank edge lines go."""
  return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


# ----------------------------------------------------------------------- plain-text segments


def segments_from_text(text: str, doc_id: str, mode: str = "paragraphs", max_chars: int = 3000) -> list[Segment]:
  """Headerless segments of plain text: one per paragraph (blank-line separated), per chunk of
  whole paragraphs packed up to `max_chars`, or one for the whole document."""
  if mode not in TEXT_MODES:
    raise ValueError(f"mode must be one of {TEXT_MODES}, got {mode!r}")
  paragraphs = [p for p in (_paragraph(block) for block in re.split(r"\n[ \t\r\f\v]*\n", text)) if p]
  if mode == "document":
    pieces = ["\n\n".join(paragraphs)] if paragraphs else []
  elif mode == "chunks":
    pieces = _pack(paragraphs, max_chars)
  else:
    pieces = paragraphs
  return [Segment(id=f"{doc_id}#{k}", doc_id=doc_id, header=None, text=piece)
          for k, piece in enumerate(pieces)]


def _paragraph(block: str) -> str:
  """Lines keep their breaks (lists, verse); spaces inside a line are collapsed."""
  return "\n".join(line for line in (_normalise(line) for line in block.splitlines()) if line)


def _pack(paragraphs: list[str], max_chars: int) -> list[str]:
  chunks, current = [], []
  for paragraph in paragraphs:
    if current and len("\n\n".join(current + [paragraph])) > max_chars:
      chunks.append("\n\n".join(current))
      current = []
    current.append(paragraph)
  if current:
    chunks.append("\n\n".join(current))
  return chunks


def segments_from_jsonl(path, text_field: str = "text", id_field: str | None = None,
                        mode: str = "paragraphs", max_chars: int = 3000,
                        name: str | None = None) -> list[Segment]:
  """Segments of JSONL documents (one per line); doc ids from `id_field` or f"{name}:{line}",
  `name` defaulting to the file name."""
  fields = [text_field] + ([id_field] if id_field else [])
  types = {id_field: (str, int)} if id_field else {}
  segments = []
  for line_number, record in read_jsonl(path, fields, types=types):
    doc_id = str(record[id_field]) if id_field else f"{name or Path(path).name}:{line_number}"
    segments += segments_from_text(record[text_field], doc_id, mode, max_chars)
  return segments


def segments_from_folder(path, text_mode: str = "paragraphs", text_field: str = "text",
                         id_field: str | None = None, max_chars: int = 3000) -> list[Segment]:
  """Segments of every *.html, *.htm, *.txt and *.jsonl file under `path`, in sorted path order.

  Doc ids are paths relative to `path`. Text files must be UTF-8; HTML may declare a charset.
  """
  root = Path(path)
  if not root.is_dir():
    raise DataError(f"{root}: not a folder; pass the folder that holds the corpus files", path=root)
  files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES),
                 key=lambda p: p.relative_to(root).as_posix())
  segments = []
  for file in files:
    doc_id = file.relative_to(root).as_posix()
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
      segments += segments_from_jsonl(file, text_field, id_field, text_mode, max_chars, name=doc_id)
    elif suffix == ".txt":
      segments += segments_from_text(_read_utf8(file), doc_id, text_mode, max_chars)
    else:
      segments += segments_from_html(file.read_bytes(), doc_id)
  return segments


def _read_utf8(file: Path) -> str:
  data = file.read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{file}: not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8",
                    path=file) from None


# ------------------------------------------------------------------------------------ filters


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
  pieces = (_normalise(p).lower() for p in re.split(r"(?<=[.!?])\s+|\n", segment.text))
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


# -------------------------------------------------------------------------------------- dedup


def dedup_exact(segments: Iterable[Segment]) -> list[Segment]:
  """The segments whose text (case and spacing ignored) did not occur earlier in the input."""
  seen, kept = set(), []
  for segment in segments:
    key = hashlib.sha1(_normalise(segment.text).lower().encode("utf-8")).digest()
    if key not in seen:
      seen.add(key)
      kept.append(segment)
  return kept


def dedup_near(segments: Iterable[Segment], threshold: float = 0.8, shingle_words: int = 5,
               num_perm: int = 128, bands: int = 16, minhash_seed: int = 0) -> list[Segment]:
  """Drops each segment whose word-shingle Jaccard with an earlier kept one is >= `threshold`.

  Candidates come from MinHash LSH (`bands` bands of num_perm/bands rows); every
  candidate pair is verified on the exact shingle sets, so LSH only costs recall, never precision.
  """
  rows = num_perm // bands
  seeds = _mix64(np.arange(num_perm, dtype=np.uint64) + np.uint64(minhash_seed) * np.uint64(num_perm))
  buckets: dict[tuple[int, bytes], list[int]] = {}
  kept, kept_shingles = [], []
  for segment in segments:
    shingles = shingle_hashes(segment.text, shingle_words)
    if shingles.size == 0:
      kept.append(segment)  # no words: only exact dedup applies
      kept_shingles.append(shingles)
      continue
    signature = _minhash(shingles, seeds)
    keys = [(band, signature[band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
    candidates = sorted({i for key in keys for i in buckets.get(key, ())})
    if any(jaccard(shingles, kept_shingles[i]) >= threshold for i in candidates):
      continue
    for key in keys:
      buckets.setdefault(key, []).append(len(kept))
    kept.append(segment)
    kept_shingles.append(shingles)
  return kept


def shingle_hashes(text: str, shingle_words: int = 5) -> np.ndarray:
  """Sorted unique 64-bit hashes of the lower-cased word `shingle_words`-grams of `text`.

  A text shorter than one shingle is a single shingle of all its words; no words, no shingles.
  """
  words = re.findall(r"\w+", text.lower())
  if not words:
    return np.zeros((0,), np.uint64)
  width = min(shingle_words, len(words))
  word_hashes = np.array([_hash64(w) for w in words], np.uint64)
  count = len(words) - width + 1
  combined = np.zeros((count,), np.uint64)
  with np.errstate(over="ignore"):
    for offset in range(width):  # polynomial hash of the word hashes, wrapping mod 2**64
      combined = combined * np.uint64(0x100000001B3) + word_hashes[offset:offset + count]
  return np.unique(_mix64(combined))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
  """|a & b| / |a | b| of two sorted unique hash arrays; 0.0 when both are empty."""
  inter = np.intersect1d(a, b, assume_unique=True).size
  union = a.size + b.size - inter
  return inter / union if union else 0.0


def _minhash(shingles: np.ndarray, seeds: np.ndarray) -> np.ndarray:
  """[num_perm] minimum of each seeded hash over the shingles."""
  return _mix64(shingles[None, :] ^ seeds[:, None]).min(axis=1)


@functools.lru_cache(maxsize=1 << 20)  # word frequencies are Zipfian: most lookups hit
def _hash64(word: str) -> np.uint64:
  return np.uint64(int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little"))


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijective, well-mixed 64-bit hash, wrapping arithmetic."""
  x = np.asarray(x, np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# ---------------------------------------------------------------------------------- pipeline


def corpus_config(cfg: Mapping | None = None) -> dict:
  """CORPUS_DEFAULTS updated by `cfg`; raises ConfigError naming an unknown or invalid field."""
  merged = dict(CORPUS_DEFAULTS)
  for key, value in dict(cfg or {}).items():
    if key not in CORPUS_DEFAULTS:
      raise ConfigError(f"corpus.{key}: unknown field (known: {', '.join(sorted(CORPUS_DEFAULTS))})")
    merged[key] = value
  if not 0 <= merged["min_chars"] <= merged["max_chars"]:
    raise ConfigError(f"corpus.min_chars/max_chars: need 0 <= min_chars <= max_chars, got "
                      f"{merged['min_chars']} and {merged['max_chars']}")
  if not 0 < merged["near_dup_threshold"] <= 1:
    raise ConfigError(f"corpus.near_dup_threshold: must be in (0, 1], got {merged['near_dup_threshold']}")
  if merged["bands"] <= 0 or merged["num_perm"] % merged["bands"]:
    raise ConfigError(f"corpus.bands: must divide corpus.num_perm={merged['num_perm']}, "
                      f"got {merged['bands']}")
  if merged["shingle_words"] < 1:
    raise ConfigError(f"corpus.shingle_words: must be at least 1, got {merged['shingle_words']}")
  return merged


def drop_nested(segments: list[Segment], parent_of: Mapping[str, str | None]) -> list[Segment]:
  """`segments` without those enclosed (through `parent_of`, any depth) by another of them."""
  present = {s.id for s in segments}

  def enclosed(segment_id: str) -> bool:
    parent = parent_of.get(segment_id)
    while parent is not None:
      if parent in present:
        return True
      parent = parent_of.get(parent)
    return False

  return [s for s in segments if not enclosed(s.id)]


def prepare_corpus(segments: Iterable[Segment], cfg: Mapping | None = None) -> tuple[list[Segment], dict]:
  """Filters, removes nested overlaps and deduplicates; returns kept segments and counts.

  The report is {"input", "dropped": {filter: n}, "nested", "exact_duplicate", "near_duplicate",
  "kept"}; every input segment is counted exactly once.
  """
  cfg = corpus_config(cfg)
  segments = list(segments)
  parent_of = {}
  for segment in segments:
    if segment.id in parent_of:
      raise DataError(f"segment id {segment.id!r} appears twice (doc {segment.doc_id!r}); "
                      "give every document a unique id", field="id")
    parent_of[segment.id] = segment.parent_id
  filters = filters_from_config(cfg)
  dropped = {name: 0 for name, _ in filters}
  passed = []
  for segment in segments:
    reason = next((r for r in (f(segment) for _, f in filters) if r is not None), None)
    if reason is None:
      passed.append(segment)
    else:
      dropped[reason] += 1
  outermost = drop_nested(passed, parent_of)
  unique = dedup_exact(outermost)
  kept = dedup_near(unique, cfg["near_dup_threshold"], cfg["shingle_words"], cfg["num_perm"],
                    cfg["bands"], cfg["minhash_seed"])
  report = {"input": len(segments), "dropped": dropped, "nested": len(passed) - len(outermost),
            "exact_duplicate": len(outermost) - len(unique), "near_duplicate": len(unique) - len(kept),
            "kept": len(kept)}
  return kept, report
