"""The corpus stage on both engines: local and Apache Beam write the same segments; WARC input."""
import io
import itertools
import json
import shutil
from pathlib import Path

import pytest

from helpers import layout
from humpback_jax import configlib
from humpback_jax.data import tfds_datasets
from humpback_jax.method import pipeline
from test_corpus import python_docs_library

ROOT = Path(__file__).resolve().parents[1]
TOY_CORPUS = ROOT / "humpback_jax" / "assets" / "toy" / "corpus"
PAGE = ("<html><body><h1>{title}</h1><p>" + " ".join(f"{{title}} fact {i}: the soil keeps water for the roots."
                                                    for i in range(20)) + "</p></body></html>")


def write_warc(path: Path, pages: dict[str, str]) -> None:
  """A gzipped WARC: one HTML response per page, plus a non-HTML response and a request record."""
  from warcio.statusandheaders import StatusAndHeaders
  from warcio.warcwriter import WARCWriter
  with open(path, "wb") as f:
    writer = WARCWriter(f, gzip=True)
    records = [(uri, "text/html; charset=utf-8", html.encode()) for uri, html in pages.items()]
    records.append(("http://example.org/logo.png", "image/png", b"\x89PNG\r\n\x1a\n"))
    for uri, content_type, payload in records:
      headers = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
      writer.write_record(writer.create_warc_record(uri, "response", payload=io.BytesIO(payload),
                                                    http_headers=headers))
    writer.write_record(writer.create_warc_record("http://example.org/a", "request",
                                                  payload=io.BytesIO(b"GET /a HTTP/1.1\r\n\r\n")))


def run_corpus_stage(tmp_path, name, corpus_path, *overrides):
  cfg = configlib.load_config("configs/toy.py", [f"--config.data.corpus_path={corpus_path}", *overrides])
  work = tmp_path / name
  pipeline.run_pipeline(cfg, work, layout(), until="prepare_corpus", progress=False)
  records = list(tfds_datasets.read_dataset(work / "datasets", "segments"))
  return records, json.loads((work / "prepare_corpus" / "manifest.json").read_text())["counts"]


def test_a_warc_file_of_html_pages_goes_through_the_corpus_stage(tmp_path):
  folder = tmp_path / "crawl"
  folder.mkdir()
  write_warc(folder / "crawl.warc.gz", {"http://example.org/a": PAGE.format(title="Tomatoes"),
                                        "http://example.org/b": PAGE.format(title="Peppers")})
  records, counts = run_corpus_stage(tmp_path, "run", folder)
  doc_ids = sorted(r["doc_id"] for r in records)
  assert [d.split("@")[0] for d in doc_ids] == ["http://example.org/a", "http://example.org/b"]
  assert all(d.split("@")[1].startswith("crawl.warc.gz:") for d in doc_ids)
  assert counts["documents"] == 2 and counts["skipped_files"]["warc_record_not_html"] == 2
  assert {r["header"] for r in records} == {"Tomatoes", "Peppers"}


@pytest.fixture
def mixed_corpus(tmp_path):
  """The toy corpus, python3-doc library pages, near-copies of some, a WARC and a JSONL file."""
  folder = tmp_path / "mixed"
  shutil.copytree(TOY_CORPUS, folder / "toy")
  library = python_docs_library()
  if library is not None:
    (folder / "library").mkdir()
    pages = list(itertools.islice(sorted(library.glob("*.html")), 30))
    for page in pages:
      shutil.copy(page, folder / "library" / page.name)
    for page in pages[:5]:  # near-duplicates: one word changed in every paragraph
      html = page.read_text(encoding="utf-8").replace("<p>", "<p>Note: ")
      (folder / "library" / f"copy_{page.name}").write_text(html, encoding="utf-8")
  write_warc(folder / "crawl.warc.gz", {"http://example.org/a": PAGE.format(title="Tomatoes")})
  (folder / "wiki.jsonl").write_text(json.dumps({"text": "\n\n".join(
      " ".join(f"w{(i * 7919 + 31 * k) % 1009}" for i in range(80)) + "." for k in range(9))}) + "\n")
  return folder


def test_local_and_beam_engines_write_identical_segments(tmp_path, mixed_corpus, capfd):
  local, local_counts = run_corpus_stage(tmp_path, "local", mixed_corpus)
  beam, beam_counts = run_corpus_stage(
      tmp_path, "beam", mixed_corpus, "--config.corpus.engine=beam",
      "--config.corpus.beam_options=--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_threading")
  out, err = capfd.readouterr()  # quiet (no --verbose): neither tfds' nor Beam's own lines
  assert not [line for line in (out + err).splitlines() if any(
      marker in line for marker in ("Downloading and preparing", "Generating splits", "WARNING:", "INFO:"))]
  assert len(local) > 100
  assert [(r["id"], r["text"], r["header"]) for r in beam] == [(r["id"], r["text"], r["header"]) for r in local]
  assert (local_counts.pop("engine"), beam_counts.pop("engine")) == ("local", "beam")
  assert beam_counts == local_counts  # every per-filter count, from Beam metrics
  if python_docs_library() is not None:
    assert local_counts["near_duplicate"] >= 5
