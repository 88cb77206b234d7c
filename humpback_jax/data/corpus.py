"""The unlabeled corpus: documents cut into segments, filtered, deduplicated (the local engine).

Per document: cut into segments (`segment.py`; a sub-section whose header fails the header
filters is left out of its parents), the filters in FILTERS order (each dropped segment counted
once, under the first filter that drops it), then nested segments: a segment that passes is
dropped as "nested" when an enclosing segment also passed, so a 2,000-character h2 section is
kept whole and a 20,000-character h1 chapter, too long itself, still yields its h2 sections.
Across documents: exact, then near duplicates with an order-independent keep rule (`dedup.py`).
Nesting is settled before dedup, so a kept section later dropped as a duplicate takes its
sub-sections with it. `corpus_beam.py` runs the same steps as an Apache Beam pipeline; both give
the same segments, written in `output_key` order.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Mapping

from humpback_jax.data import dedup, documents, filters
from humpback_jax.data.documents import Document, TextOptions
from humpback_jax.data.segment import TEXT_MODES, Segment, segments_from_html, segments_from_text
from humpback_jax.errors import ConfigError, DataError

ENGINES = ("local", "beam")
CORPUS_DEFAULTS = dict(
    min_chars=600,                     # later report of the paper: keep 600-3,000 characters
    max_chars=3000,
    header_capital_share=0.5,          # drop when more than this share of cased letters is upper
    max_repeated_sentence_share=0.0,   # 0: any repeated sentence drops the segment
    min_sentence_chars=20,             # shorter "sentences" ("Example:") may repeat freely
    navigation_phrases=filters.NAVIGATION_PHRASES,
    navigation_headers=filters.NAVIGATION_HEADERS,
    near_dup_threshold=0.8,            # Jaccard of word shingles
    shingle_words=5,
    num_perm=128,
    bands=16,                          # LSH: 16 bands x 8 rows
    minhash_seed=0,
    text_mode="paragraphs",            # plain text (txt, JSONL, tfds): "paragraphs" packed into
                                       # min_chars..max_chars windows, or one "document"
    engine="local",                    # or "beam": the same steps as an Apache Beam pipeline
    beam_options="",                   # Beam PipelineOptions as flags ("--runner=... --direct_num_workers=2")
)


# ---------------------------------------------------------------------------------- config


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
  for key, allowed in (("text_mode", TEXT_MODES), ("engine", ENGINES)):
    if merged[key] not in allowed:
      raise ConfigError(f"corpus.{key}: must be one of {', '.join(allowed)}, got {merged[key]!r}")
  return merged


@dataclasses.dataclass(frozen=True)
class CorpusSource:
  """Where the documents come from: a folder (or one file), or a prepared tfds text dataset."""
  path: str = ""
  tfds_name: str = ""
  split: str = "train"
  options: TextOptions = TextOptions()


def source_from_config(data_cfg) -> CorpusSource:
  """The corpus source a run config's `data` fields name."""
  return CorpusSource(path=str(data_cfg.corpus_path or ""), tfds_name=data_cfg.corpus_tfds_name,
                      split=data_cfg.corpus_split, options=TextOptions(text_field=data_cfg.corpus_text_field))


# ------------------------------------------------------------------------ per document


def cut_document(doc: Document, cfg: Mapping | None = None) -> list[Segment]:
  """A document's segments; with `cfg`, failing sub-sections are left out of their parents."""
  cfg = corpus_config(cfg)
  if doc.kind == "html":
    return segments_from_html(doc.content, doc.id, filters.header_check_from_config(cfg))
  return segments_from_text(doc.content, doc.id, cfg["text_mode"], cfg["min_chars"], cfg["max_chars"])


def filter_segments(segments: Iterable[Segment], cfg: Mapping) -> tuple[list[Segment], collections.Counter]:
  """The segments passing every filter and not enclosed by another that passes, and the counts."""
  counts = collections.Counter()
  named_filters = filters.filters_from_config(cfg)
  passed, parent_of = [], {}
  for segment in segments:
    counts["input"] += 1
    parent_of[segment.id] = segment.parent_id
    reason = next((r for r in (f(segment) for _, f in named_filters) if r is not None), None)
    if reason is None:
      passed.append(segment)
    else:
      counts[reason] += 1
  outermost = drop_nested(passed, parent_of)
  counts["nested"] += len(passed) - len(outermost)
  return outermost, counts


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


def output_key(segment_id: str) -> int:
  """Where a kept segment goes in the written dataset: a 128-bit hash of its id (a fixed shuffle)."""
  return int.from_bytes(hashlib.blake2b(segment_id.encode("utf-8"), digest_size=16).digest(), "big")


def make_report(counts: Mapping[str, int], cfg: Mapping) -> dict:
  """The corpus report: files, documents, segments in, dropped per filter, nested, duplicates, kept.

  Every input segment is counted exactly once.
  """
  return {"files": counts.get("files", 0),
          "skipped_files": {r: counts.get(r, 0) for r in documents.SKIP_REASONS},
          "documents": counts.get("documents", 0), "input": counts.get("input", 0),
          "dropped": {name: counts.get(name, 0) for name, _ in filters.filters_from_config(cfg)},
          **{k: counts.get(k, 0) for k in ("nested", "exact_duplicate", "near_duplicate", "kept")}}


# -------------------------------------------------------------------------- local engine


def prepare_corpus(segments: Iterable[Segment], cfg: Mapping | None = None) -> tuple[list[Segment], dict]:
  """Filters, removes nested overlaps and deduplicates cut segments; returns kept ones (input
  order) and the report (`make_report`)."""
  cfg = corpus_config(cfg)
  segments = list(segments)
  seen = set()
  for segment in segments:
    if segment.id in seen:
      raise DataError(f"segment id {segment.id!r} appears twice (doc {segment.doc_id!r}); "
                      "give every document a unique id", field="id")
    seen.add(segment.id)
  passed, counts = filter_segments(segments, cfg)
  unique = dedup.dedup_exact(passed)
  near = dedup.near_duplicate_ids(unique, cfg)
  kept = [s for s in unique if s.id not in near]
  counts.update(exact_duplicate=len(passed) - len(unique), near_duplicate=len(near), kept=len(kept))
  return kept, make_report(counts, cfg)


def read_documents(source: CorpusSource, counts: collections.Counter) -> Iterator[Document]:
  """Every document of `source`, in file order; files, documents and skips counted in `counts`."""
  if source.tfds_name:
    from humpback_jax.data import tfds_datasets  # tensorflow_datasets loads only when used
    texts = tfds_datasets.read_text_dataset(source.tfds_name, text_field=source.options.text_field,
                                            split=source.split, data_dir=source.path or None)
    for doc in documents.tfds_documents(texts, source.tfds_name):
      counts["documents"] += 1
      yield doc
    return
  files, skipped = documents.list_files(source.path)
  counts.update(skipped)
  for relative in files:
    counts["files"] += 1
    for item in documents.read_file(source.path, relative, source.options):
      if isinstance(item, str):
        counts[item] += 1
      else:
        counts["documents"] += 1
        yield item


def prepare_local(source: CorpusSource, cfg: Mapping | None = None) -> tuple[list[Segment], dict]:
  """The whole corpus stage in this process: kept segments in `output_key` order and the report."""
  cfg = corpus_config(cfg)
  counts = collections.Counter()
  doc_ids, segments = set(), []
  for doc in read_documents(source, counts):
    if doc.id in doc_ids:
      raise DataError(f"{source.path or source.tfds_name}: document id {doc.id!r} appears twice; "
                      "give every document a unique id", path=source.path, field="id")
    doc_ids.add(doc.id)
    segments += cut_document(doc, cfg)
  kept, report = prepare_corpus(segments, cfg)
  report.update({k: counts.get(k, 0) for k in ("files", "documents")},
                skipped_files={r: counts.get(r, 0) for r in documents.SKIP_REASONS})
  return sorted(kept, key=lambda s: output_key(s.id)), report


def raw_segments(source: CorpusSource, cfg: Mapping | None = None) -> list[Segment]:
  """Every segment of the corpus before filters (the toy base model pretrains on them)."""
  cfg = corpus_config(cfg)
  raw_cut = lambda doc: (segments_from_html(doc.content, doc.id) if doc.kind == "html" else
                         segments_from_text(doc.content, doc.id, cfg["text_mode"], cfg["min_chars"],
                                            cfg["max_chars"]))
  return [s for doc in read_documents(source, collections.Counter()) for s in raw_cut(doc)]


def segments_from_folder(path, cfg: Mapping | None = None) -> list[Segment]:
  """Segments (cut by `cut_document`) of every corpus file under `path`, in sorted path order."""
  counts = collections.Counter()
  return [s for doc in read_documents(CorpusSource(path=str(path)), counts) for s in cut_document(doc, cfg)]

