"""Corpus preparation: HTML and text -> segments -> filters -> nested overlaps -> exact and near dedup."""
import glob
import html as html_lib
import itertools
import json
import shutil
from pathlib import Path

import bs4
import pytest
from hypothesis import given, settings, strategies as st

from humpback_jax.data import corpus, dedup, documents, filters, segment as seg
from humpback_jax.data.segment import Segment
from humpback_jax.errors import ConfigError, DataError

DOC = """<!DOCTYPE html><html><head><title>Garden</title><style>p {color: red}</style></head><body>
<nav><h2>Menu</h2><ul><li>Home</li><li>Shop</li></ul></nav>
<h1>Growing tomatoes</h1>
<p>Tomatoes   need
   sun.</p>
<script>var tracking = 1;</script>
<h2>Soil<a class="headerlink" href="#soil">¶</a></h2>
<p>Use <b>rich</b>, well-drained soil.</p>
<h3>Compost</h3>
<p>Add compost <!-- hidden comment --> in spring.</p>
<h2>Watering</h2>
<p>Water deeply.<br>Twice a week.</p>
<pre>for day in week:
    water()
</pre>
<footer><h3>Contact us</h3><p>Call 555-0100.</p></footer>
<div role="navigation"><h3>Previous topic</h3><p>Peppers</p></div>
</body></html>"""


def segments_by_header(segments):
  return {s.header: s for s in segments}


def test_each_header_opens_a_segment_in_document_order():
  segments = seg.segments_from_html(DOC, "garden.html")
  assert [(s.id, s.header, s.level) for s in segments] == [
      ("garden.html#0", "Growing tomatoes", 1), ("garden.html#1", "Soil", 2),
      ("garden.html#2", "Compost", 3), ("garden.html#3", "Watering", 2)]


def test_a_segment_holds_its_sub_headers_and_their_text_as_paragraphs():
  soil = segments_by_header(seg.segments_from_html(DOC, "garden.html"))["Soil"]
  assert soil.text == "Use rich, well-drained soil.\n\nCompost\n\nAdd compost in spring."


def test_a_segment_ends_at_the_next_header_of_the_same_or_higher_level():
  by_header = segments_by_header(seg.segments_from_html(DOC, "garden.html"))
  assert by_header["Compost"].text == "Add compost in spring."
  assert by_header["Growing tomatoes"].text.startswith("Tomatoes need sun.\n\nSoil\n\n")
  assert by_header["Growing tomatoes"].text.endswith("water()")


def test_nested_segments_point_to_the_segment_that_encloses_them():
  by_header = segments_by_header(seg.segments_from_html(DOC, "garden.html"))
  assert by_header["Growing tomatoes"].parent_id is None
  assert by_header["Soil"].parent_id == "garden.html#0"
  assert by_header["Compost"].parent_id == "garden.html#1"
  assert by_header["Watering"].parent_id == "garden.html#0"


def test_navigation_footer_scripts_comments_and_permalinks_are_removed():
  segments = seg.segments_from_html(DOC, "garden.html")
  everything = " ".join(f"{s.header} {s.text}" for s in segments)
  for gone in ("Menu", "Shop", "tracking", "hidden comment", "555-0100", "Previous topic", "Peppers", "¶"):
    assert gone not in everything


def test_line_breaks_split_paragraphs_and_pre_keeps_code_indentation():
  watering = segments_by_header(seg.segments_from_html(DOC, "garden.html"))["Watering"]
  assert watering.text == "Water deeply.\n\nTwice a week.\n\nfor day in week:\n    water()"


def test_a_segment_ends_with_its_section_even_without_a_next_header():
  doc = ("<body><section><h1>Guide</h1><p>Body text.</p></section>"
         "<div class='sidebar'><p>Sidebar links</p></div></body>")
  assert [s.text for s in seg.segments_from_html(doc, "d")] == ["Body text."]


def test_an_empty_sub_header_adds_no_blank_paragraph():
  [outer, inner] = seg.segments_from_html("<h2>Outer</h2><p>One.</p><h3></h3><p>Two.</p>", "d")
  assert (outer.text, inner.header) == ("One.\n\nTwo.", "")


def test_text_before_the_first_header_is_in_no_segment():
  segments = seg.segments_from_html("<p>Preamble.</p><h2>Title</h2><p>Body.</p>", "d")
  assert [(s.header, s.text) for s in segments] == [("Title", "Body.")]


def test_html_bytes_are_decoded_by_their_declared_charset():
  doc = '<html><head><meta charset="iso-8859-1"></head><body><h1>Caf\xe9</h1><p>cr\xe8me</p></body></html>'
  [segment] = seg.segments_from_html(doc.encode("iso-8859-1"), "d")
  assert (segment.header, segment.text) == ("Café", "crème")


WORDS = st.text(alphabet="abcXYZ&<>é.", min_size=1, max_size=8)
INLINE = st.tuples(st.sampled_from(["", "b", "i", "code", "span", "a"]), WORDS)
BLOCK = st.one_of(
    st.tuples(st.integers(1, 6), WORDS),                                   # header
    st.tuples(st.sampled_from(["p", "div", "li", "td", "blockquote"]), st.lists(INLINE, max_size=5)),
)


def render(blocks):
  parts = []
  for tag, content in blocks:
    if isinstance(tag, int):
      parts.append(f"<h{tag}>{html_lib.escape(content)}</h{tag}>")
    else:
      inner = " ".join(f"<{t}>{html_lib.escape(w)}</{t}>" if t else html_lib.escape(w) for t, w in content)
      parts.append(f"<{tag}>{inner}</{tag}>")
  return "<html><body>" + "\n".join(parts) + "</body></html>"


@settings(max_examples=200)
@given(st.lists(BLOCK, max_size=12))
def test_segment_text_is_made_of_the_documents_own_text(blocks):
  html = render(blocks)
  document_text = " ".join(bs4.BeautifulSoup(html, "lxml").get_text().split())
  for segment in seg.segments_from_html(html, "doc"):
    assert segment.header in document_text
    paragraphs = segment.text.split("\n\n") if segment.text else []  # a header may have no body
    for paragraph in paragraphs:
      assert paragraph and " ".join(paragraph.split()) in document_text


def test_plain_text_paragraphs_keep_their_line_breaks_and_have_no_header():
  segments = seg.segments_from_text("First  line\nsecond line\n\n\n- item\n- item two\n", "notes.txt", min_chars=1)
  assert [(s.id, s.header, s.text) for s in segments] == [
      ("notes.txt#0", None, "First line\nsecond line"), ("notes.txt#1", None, "- item\n- item two")]


def test_paragraph_windows_close_at_min_chars_and_never_pass_max_chars():
  text = "\n\n".join(["a" * 40, "b" * 40, "c" * 40, "d" * 100, "e" * 10])
  lengths = [len(s.text) for s in seg.segments_from_text(text, "d", min_chars=80, max_chars=120)]
  assert lengths == [82, 40, 112]  # c could not join d (142 > 120); the short tail e joined d
  assert len(seg.segments_from_text(text, "d", mode="document")) == 1


def wiki_document(paragraphs=8, chars=375, first=0):
  """Paragraphs of `chars` characters sharing no sentence or 5-word shingle."""
  return "\n\n".join(words(100, seed=i)[:chars - 1] + "." for i in range(first, first + paragraphs))


def test_a_wiki_like_plain_text_document_of_short_paragraphs_is_kept_in_windows():
  kept, report = corpus.prepare_corpus(seg.segments_from_text(wiki_document(), "wiki.txt"))
  assert report["kept"] == 4 and all(600 <= len(s.text) <= 3000 for s in kept)
  assert "\n\n".join(s.text for s in kept) == seg.segments_from_text(wiki_document(), "w", mode="document")[0].text


@pytest.mark.parametrize("mode, kept", [("paragraphs", 3), ("document", 1)])
def test_the_text_mode_config_field_cuts_jsonl_and_text_files(tmp_path, mode, kept):
  (tmp_path / "wiki.txt").write_text(wiki_document(7))  # 2,637 characters: one document fits
  (tmp_path / "wiki.jsonl").write_text(json.dumps({"text": wiki_document(7, first=8)}) + "\n")
  segments, report = corpus.prepare_local(corpus.CorpusSource(path=str(tmp_path)), {"text_mode": mode})
  assert sorted(s.doc_id for s in segments) == sorted(["wiki.txt", "wiki.jsonl:1"] * kept)
  assert report["documents"] == 2


@pytest.mark.parametrize("mode, kept", [("paragraphs", 3), ("document", 1)])
def test_the_text_mode_config_field_cuts_a_tfds_text_corpus(tmp_path, mode, kept):
  from humpback_jax.data import tfds_datasets
  path = tfds_datasets.write_segments_dataset([dict(id="a", doc_id="a", header="", text=wiki_document(7))],
                                              tmp_path, "wiki")
  segments, report = corpus.prepare_local(corpus.CorpusSource(tfds_name=path), {"text_mode": mode})
  assert [s.doc_id for s in segments] == [f"{path}-0"] * kept and report["documents"] == 1


def test_jsonl_documents_take_ids_from_the_id_field(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text('{"id": "doc-a", "text": "One.\\n\\nTwo."}\n{"id": "doc-b", "text": "Three."}\n')
  docs = list(documents.read_file(tmp_path, "docs.jsonl", documents.TextOptions(id_field="id")))
  assert [(d.id, d.content) for d in docs] == [("doc-a", "One.\n\nTwo."), ("doc-b", "Three.")]


def test_a_folder_is_read_in_sorted_path_order(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "page.html").write_text("<h1>Page</h1><p>HTML body.</p>")
  (tmp_path / "a.txt").write_text("Plain text.")
  (tmp_path / "c.jsonl").write_text('{"text": "A record."}\n')
  (tmp_path / "ignored.pdf").write_bytes(b"%PDF")
  assert [s.id for s in corpus.segments_from_folder(tmp_path)] == ["a.txt#0", "b/page.html#0", "c.jsonl:1#0"]


def test_a_non_utf8_text_file_is_named_in_the_error(tmp_path):
  (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
  with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8 at byte 3"):
    list(corpus.segments_from_folder(tmp_path))


# Filters: each returns its name when it drops the segment and None when it keeps it.

def segment(text="x" * 700, header="How to grow tomatoes", **fields):
  return Segment(id=fields.pop("id", "d#0"), doc_id="d", header=header, text=text, **fields)


def test_length_filter_keeps_600_to_3000_characters():
  assert [filters.filter_length(segment("x" * n)) for n in (599, 600, 3000, 3001)] == [
      "length", None, None, "length"]


def test_empty_header_filter_drops_blank_html_headers_but_not_plain_text():
  assert filters.filter_empty_header(segment(header="  ")) == "empty_header"
  assert filters.filter_empty_header(segment(header=None)) is None
  assert filters.filter_empty_header(segment()) is None


@pytest.mark.parametrize("header", [
    "Advertisement", "Forum", "Quick Links", "Related posts", "Navigation", "Main menu",
    "Share this:", "Comments (12)", "Subscribe", "Cookie policy", "Sign in", "Contact us",
    "Privacy", "Copyright", "Sponsored content", "Tags", "Categories", "Archive", "Search",
    "Table of Contents", "Previous topic", "Next topic", "This Page", "Quick search"])
def test_navigation_header_filter_drops_boilerplate_headers(header):
  assert filters.filter_navigation_header(segment(header=header)) == "navigation_header"


@pytest.mark.parametrize("header", [
    "Binary search trees", "tarfile — Read and write tar archive files", "Comments in Python",
    "How to grow tomatoes", "Navigating the file system"])
def test_navigation_header_filter_keeps_topics_that_merely_contain_a_navigation_word(header):
  assert filters.filter_navigation_header(segment(header=header)) is None


def test_all_caps_header_filter():
  assert filters.filter_all_caps_header(segment(header="BUY NOW")) == "all_caps_header"
  assert filters.filter_all_caps_header(segment(header="Using the API")) is None
  assert filters.filter_all_caps_header(segment(header="2023")) is None


def test_header_capital_share_filter_uses_the_threshold():
  header = segment(header="The HTTP API")  # 8 of 10 cased letters upper
  assert filters.filter_header_capital_share(header, max_share=0.5) == "header_capital_share"
  assert filters.filter_header_capital_share(header, max_share=0.8) is None
  assert filters.filter_header_capital_share(segment(header="How To Grow Tomatoes")) is None


def test_repeated_sentences_filter_drops_a_repeated_sentence():
  sentence = "Click here to read the full article today."
  assert filters.filter_repeated_sentences(segment(f"{sentence} Other words here, fine. {sentence}")) == (
      "repeated_sentences")
  assert filters.filter_repeated_sentences(segment("One sentence is here. Another one is there.")) is None


def test_repeated_sentences_filter_allows_short_phrases_and_code_lines_to_repeat():
  text = "For example:\n>>> parser.print_help()\nSome text that explains it.\nFor example:\n>>> parser.print_help()"
  assert filters.filter_repeated_sentences(segment(text)) is None


def test_repeated_sentences_filter_share_threshold():
  text = " ".join(["A sentence that repeats itself."] * 2 + [f"Distinct sentence number {i}." for i in range(8)])
  assert filters.filter_repeated_sentences(segment(text), max_share=0.05) == "repeated_sentences"
  assert filters.filter_repeated_sentences(segment(text), max_share=0.2) is None


# Dedup.

def words(n, seed=0):
  """n pseudo-random words; different seeds share no 5-word shingle (different strides mod 1009)."""
  return " ".join(f"w{i * (7919 + 2 * seed) % 1009}" for i in range(n))


def text_segments(texts):
  return [segment(text, id=f"d#{i}") for i, text in enumerate(texts)]


def test_exact_dedup_ignores_case_and_spacing_and_keeps_the_smallest_id():
  segments = text_segments(["Hello  World.", "hello world.", "Other."])
  assert [s.id for s in dedup.dedup_exact(segments)] == ["d#0", "d#2"]
  assert [s.id for s in dedup.dedup_exact(segments[::-1])] == ["d#2", "d#0"]


@settings(max_examples=50)
@given(st.permutations(range(6)))
def test_near_dedup_keeps_the_same_ids_in_any_input_order(order):
  base = words(200)
  texts = [base, base.replace("w0 ", "a ", 1), base.replace("w7 ", "b ", 1), words(200, seed=3),
           words(200, seed=3).replace("w0 ", "c ", 1), words(200, seed=4)]
  segments = text_segments(texts)
  kept = {s.id for s in dedup.dedup_near([segments[i] for i in order])}
  assert kept == {"d#0", "d#3", "d#5"}  # the smallest id of each near-duplicate group


def test_near_dedup_drops_a_copy_with_one_word_changed():
  base = words(200)
  edited = base.replace("w0 ", "changed ", 1)
  assert [s.id for s in dedup.dedup_near(text_segments([base, edited, words(200, seed=3)]))] == ["d#0", "d#2"]


def test_near_dedup_keeps_texts_below_the_threshold():
  base = words(200).split()
  half_changed = " ".join(w if i % 2 else f"x{i}" for i, w in enumerate(base))
  assert len(dedup.dedup_near(text_segments([" ".join(base), half_changed]))) == 2


def test_shingle_jaccard_matches_a_set_computation():
  a, b = words(60).split(), (words(40) + " " + words(30, seed=5)).split()
  shingles = lambda ws: {tuple(ws[i:i + 5]) for i in range(len(ws) - 4)}
  expected = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
  got = dedup.jaccard(dedup.shingle_hashes(" ".join(a)), dedup.shingle_hashes(" ".join(b)))
  assert got == pytest.approx(expected)
  assert dedup.shingle_hashes(" ".join(a)).size == len(shingles(a))


def dedup_both(segments):
  return dedup.dedup_near(dedup.dedup_exact(segments), threshold=0.5)


@settings(max_examples=200)
@given(st.lists(st.lists(st.sampled_from("ab cd ef gh ij".split()), max_size=14).map(" ".join), max_size=12))
def test_dedup_is_idempotent_and_keeps_an_ordered_subset(texts):
  segments = text_segments(texts)
  once = dedup_both(segments)
  assert dedup_both(once) == once
  assert once == [s for s in segments if s in once]  # input order, no copies


# prepare_corpus.

PARAGRAPH = "Tomatoes grow best in full sun with rich soil and regular deep watering in the morning."


def section(level, title, n_words, seed):
  return f"<h{level}>{title}</h{level}><p>{words(n_words, seed)}.</p>"


def test_an_enclosing_segment_that_passes_wins_over_its_sub_sections():
  doc = section(2, "Planting", 40, 0) + section(3, "Spacing", 150, 1) + section(3, "Depth", 150, 2)
  kept, report = corpus.prepare_corpus(seg.segments_from_html(doc, "d"), {"max_chars": 3000})
  assert [s.header for s in kept] == ["Planting"]
  assert report["nested"] == 2


def test_sub_sections_are_kept_when_the_enclosing_segment_is_dropped():
  doc = section(2, "Planting", 40, 0) + section(3, "Spacing", 150, 1) + section(3, "Depth", 150, 2)
  kept, report = corpus.prepare_corpus(seg.segments_from_html(doc, "d"), {"max_chars": 1000})
  assert [s.header for s in kept] == ["Spacing", "Depth"]
  assert report["dropped"]["length"] == 1 and report["nested"] == 0


def test_a_sub_section_that_fails_the_header_filters_is_left_out_of_its_kept_parent():
  doc = (section(2, "Planting", 100, 0) + section(3, "Related posts", 40, 1) + section(3, "Depth", 40, 2)
         + section(3, "LEAVE A COMMENT", 40, 3))
  kept, report = corpus.prepare_corpus(corpus.cut_document(documents.Document("d", "html", doc)))
  [planting] = kept
  assert planting.header == "Planting" and "Depth" in planting.text and words(40, 2) in planting.text
  for gone in ("Related posts", words(40, 1), "LEAVE A COMMENT", words(40, 3)):
    assert gone not in planting.text
  assert report["dropped"]["navigation_header"] == 2  # the sub-sections themselves, counted once each


def test_a_sub_section_inside_a_failing_one_keeps_its_own_text():
  doc = section(2, "Related posts", 10, 0) + section(3, "Pruning", 130, 1)
  [related, pruning] = corpus.cut_document(documents.Document("d", "html", doc))
  assert pruning.text == words(130, 1) + "." and related.parent_id is None and pruning.parent_id == "d#0"


def test_report_counts_every_segment_once_under_the_first_filter_that_drops_it():
  repeated = (PARAGRAPH + " ") * 10
  segments = text_segments(["short", repeated, repeated.upper(), repeated + "Fine!"])
  segments += [segment("x" * 700, header="MENU", id="nav#0"), segment(words(150), id="w#0"),
               segment(words(150).replace("w0 ", "y ", 1), id="w#1")]
  kept, report = corpus.prepare_corpus(segments)
  assert report["dropped"]["navigation_header"] == 1  # "MENU" is also all caps: counted once, first filter
  assert report["dropped"]["all_caps_header"] == 0
  assert report["dropped"]["length"] == 1
  assert report["dropped"]["repeated_sentences"] == 3
  assert report["near_duplicate"] == 1
  assert report["input"] == sum(report["dropped"].values()) + report["nested"] + \
      report["exact_duplicate"] + report["near_duplicate"] + report["kept"]
  assert [s.id for s in kept] == ["w#0"]


def test_exact_duplicates_are_counted_in_the_report():
  segments = text_segments([words(150), words(150), words(150, seed=1)])
  kept, report = corpus.prepare_corpus(segments)
  assert (report["exact_duplicate"], report["kept"]) == (1, 2)


def test_repeated_segment_ids_are_an_error():
  with pytest.raises(DataError, match="segment id 'd#0' appears twice"):
    corpus.prepare_corpus([segment(), segment()])


def test_an_unknown_config_field_is_named():
  with pytest.raises(ConfigError, match="corpus.min_char: unknown field"):
    corpus.prepare_corpus([], {"min_char": 10})


def test_bands_must_divide_permutations():
  with pytest.raises(ConfigError, match="corpus.bands"):
    corpus.corpus_config({"num_perm": 128, "bands": 10})


# Real HTML: the CPython documentation from Debian's python3-doc (apt-get install -y python3-doc).

SPHINX_NAVIGATION = ("Navigation", "Table of Contents", "Previous topic", "Next topic", "This Page",
                     "Quick search", "Report a Bug", "Show Source")


def python_docs_library():
  candidates = ["/usr/share/doc/python3/html/library", *sorted(glob.glob("/usr/share/doc/python3.*/html/library"))]
  return next((Path(p) for p in candidates if Path(p).is_dir()), None)


@pytest.fixture
def python_docs_subset(tmp_path):
  library = python_docs_library()
  if library is None:
    pytest.skip("CPython HTML docs not found; install them with: apt-get install -y python3-doc")
  for page in itertools.islice(sorted(library.glob("*.html")), 40):
    shutil.copy(page, tmp_path / page.name)
  return tmp_path


def test_real_python_docs_prepare_into_clean_segments(python_docs_subset):
  segments = list(corpus.segments_from_folder(python_docs_subset))
  kept, report = corpus.prepare_corpus(segments)
  assert report["input"] == len(segments) > 100
  assert report["input"] == sum(report["dropped"].values()) + report["nested"] + \
      report["exact_duplicate"] + report["near_duplicate"] + report["kept"]
  assert len(kept) > 20
  for s in kept:
    assert 600 <= len(s.text) <= 3000
    assert s.header not in SPHINX_NAVIGATION
    assert "Previous topic" not in s.text and "¶" not in s.header


@pytest.mark.parametrize("header", SPHINX_NAVIGATION)
def test_sphinx_sidebar_headers_are_navigation_headers(header):
  assert filters.filter_navigation_header(segment(header=header)) == "navigation_header"
