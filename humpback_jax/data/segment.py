"""Documents cut into segments: HTML by headers, plain text into paragraph windows or whole.

Segments (METHOD.md: "the text that follows an HTML header"). Each h1-h6 header opens a segment
that runs to the next header of the same or a higher level, or to the end of the header's
enclosing <section>/<article>/<main>/<body>, whichever comes first; sub-headers and their text
are inside it, the sub-header as its own paragraph, unless the sub-header fails the header
filters ("Related posts" inside a kept article): then that sub-section is left out of every
enclosing segment. Nested headers give overlapping segments, each knowing its enclosing one
(`parent_id`). Text before the first header is in no segment.
Plain text has no headers: `segments_from_text` packs its paragraphs into windows of
`min_chars`..`max_chars` characters, or makes one segment per document, with `header=None`.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import bs4

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
TEXT_MODES = ("paragraphs", "document")

HeaderCheck = Callable[[str], "str | None"]  # header text -> the failing filter's name, or None


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


def segments_from_html(html: str | bytes, doc_id: str, header_check: HeaderCheck | None = None) -> list[Segment]:
  """Segments of one HTML document; bytes are decoded by the declared or detected charset.

  With `header_check`, a sub-section whose header fails it is left out of enclosing segments.
  """
  soup = bs4.BeautifulSoup(html, "lxml")
  _drop_boilerplate(soup)
  root = soup.body or soup
  blocks, section_end = _blocks(root)
  return _segments_from_blocks(blocks, section_end, doc_id, header_check)


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
    text = normalise("".join(pending))
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


def _segments_from_blocks(blocks: list[_Block], section_end: dict[int, int], doc_id: str,
                          header_check: HeaderCheck | None) -> list[Segment]:
  ends = {}  # header block index -> index of the first block after its segment
  for i, block in enumerate(blocks):
    if block.level:
      end = section_end.get(block.container, len(blocks))
      ends[i] = next((j for j in range(i + 1, end) if 0 < blocks[j].level <= block.level), end)
  # failing[j]: the innermost header covering block j that fails the header filters (-1: none);
  # segment i leaves out block j when that header is inside it (failing[j] > i).
  failing = [-1] * len(blocks)
  if header_check is not None:
    for i, end in ends.items():  # in document order, so inner headers overwrite outer ones
      if header_check(blocks[i].text) is not None:
        failing[i:end] = [i] * (end - i)
  segments, open_headers = [], []  # open_headers: (level, end, segment id) of enclosing headers
  for i, end in ends.items():
    level = blocks[i].level
    while open_headers and (open_headers[-1][1] <= i or open_headers[-1][0] >= level):
      open_headers.pop()
    segment_id = f"{doc_id}#{len(segments)}"
    body = (b.text for j, b in enumerate(blocks[i + 1:end], i + 1) if b.text and failing[j] <= i)
    segments.append(Segment(id=segment_id, doc_id=doc_id, header=blocks[i].text, text="\n\n".join(body),
                            level=level, parent_id=open_headers[-1][2] if open_headers else None))
    open_headers.append((level, end, segment_id))
  return segments


def _header_text(header: bs4.Tag) -> str:
  return normalise(header.get_text()).rstrip("¶§").rstrip()


def normalise(text: str) -> str:
  """`text` with every run of white space turned into one space, trimmed."""
  return " ".join(text.split())


def _preformatted(text: str) -> str:
  """Code keeps its lines and indentation; only trailing spaces and blank edge lines go."""
  return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


# ----------------------------------------------------------------------- plain-text segments


def segments_from_text(text: str, doc_id: str, mode: str = "paragraphs", min_chars: int = 600,
                       max_chars: int = 3000) -> list[Segment]:
  """Headerless segments of plain text: paragraphs (blank-line separated) packed into windows of
  `min_chars`..`max_chars` characters ("paragraphs"), or the whole document ("document")."""
  if mode not in TEXT_MODES:
    raise ValueError(f"mode must be one of {TEXT_MODES}, got {mode!r}")
  paragraphs = [p for p in (_paragraph(block) for block in re.split(r"\n[ \t\r\f\v]*\n", text)) if p]
  if mode == "document":
    pieces = ["\n\n".join(paragraphs)] if paragraphs else []
  else:
    pieces = pack_paragraphs(paragraphs, min_chars, max_chars)
  return [Segment(id=f"{doc_id}#{k}", doc_id=doc_id, header=None, text=piece)
          for k, piece in enumerate(pieces)]


def _paragraph(block: str) -> str:
  """Lines keep their breaks (lists, verse); spaces inside a line are collapsed."""
  return "\n".join(line for line in (normalise(line) for line in block.splitlines()) if line)


def pack_paragraphs(paragraphs: list[str], min_chars: int, max_chars: int) -> list[str]:
  """Whole paragraphs, in order, packed into windows closed once they reach `min_chars`.

  A paragraph that would push a window past `max_chars` starts the next one; a short tail joins
  the last window when it fits. Windows outside min..max (one huge paragraph) are left to the
  length filter.
  """
  windows, current = [], ""
  for paragraph in paragraphs:
    if current and len(current) + 2 + len(paragraph) > max_chars:
      windows.append(current)
      current = ""
    current = f"{current}\n\n{paragraph}" if current else paragraph
    if len(current) >= min_chars:
      windows.append(current)
      current = ""
  if current:
    if windows and len(windows[-1]) + 2 + len(current) <= max_chars:
      windows[-1] = f"{windows[-1]}\n\n{current}"
    else:
      windows.append(current)
  return windows
