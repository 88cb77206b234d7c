"""The corpus walk stays inside its folder and counts every file it cannot use, by reason."""
import pytest

from humpback_jax.data import corpus

PAGE = "<h1>Tomatoes</h1><p>" + " ".join(f"Tomatoes need sun and water, fact {i}." for i in range(25)) + "</p>"


def prepare(folder):
  return corpus.prepare_local(corpus.CorpusSource(path=str(folder)))


@pytest.fixture
def corpus_folder(tmp_path):
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "secret.txt").write_text("root:x:0:0:root:/root:/bin/bash\n" * 40)
  (outside / "pages").mkdir()
  (outside / "pages" / "more.html").write_text(PAGE.replace("Tomatoes", "Peppers"))
  folder = tmp_path / "corpus"
  folder.mkdir()
  (folder / "page.html").write_text(PAGE)
  return folder, outside


def test_a_symlink_to_a_file_outside_the_corpus_is_skipped_and_counted(corpus_folder):
  folder, outside = corpus_folder
  (folder / "passwd.txt").symlink_to(outside / "secret.txt")
  (folder / "linked").symlink_to(outside / "pages", target_is_directory=True)
  kept, report = prepare(folder)
  assert [s.doc_id for s in kept] == ["page.html"]
  assert report["skipped_files"]["symlink_outside_root"] == 1
  assert report["skipped_files"]["symlinked_folder"] == 1
  assert report["files"] == 1


def test_a_symlink_inside_the_corpus_is_read(corpus_folder):
  folder, _ = corpus_folder
  (folder / "sub").mkdir()
  (folder / "sub" / "peppers.html").write_text(PAGE.replace("Tomatoes", "Peppers"))
  (folder / "alias.html").symlink_to(folder / "sub" / "peppers.html")
  kept, report = prepare(folder)
  assert report["files"] == 3 and report["skipped_files"]["symlink_outside_root"] == 0
  assert report["exact_duplicate"] == 1  # the alias is the same page


def test_empty_binary_and_unreadable_files_are_counted_per_reason(corpus_folder):
  folder, _ = corpus_folder
  (folder / "empty.html").write_bytes(b"")
  (folder / "blank.txt").write_text("  \n\n")
  (folder / "image.html").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
  (folder / "gone.html").symlink_to(folder / "deleted.html")  # dangling: unreadable even for root
  (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
  kept, report = prepare(folder)
  assert report["skipped_files"] == dict(
      symlink_outside_root=0, symlinked_folder=0, unsupported_type=1, unreadable=1, binary=1,
      empty=2, warc_record_not_html=0)
  assert report["documents"] == 1 and [s.doc_id for s in kept] == ["page.html"]


def test_the_pipeline_manifest_carries_the_skip_counts(corpus_folder, tmp_path):
  from humpback_jax import configlib
  from humpback_jax.method import pipeline
  from helpers import layout
  folder, outside = corpus_folder
  (folder / "passwd.txt").symlink_to(outside / "secret.txt")
  (folder / "empty.html").write_bytes(b"")
  cfg = configlib.load_config("configs/toy.py", [f"--config.data.corpus_path={folder}"])
  work = tmp_path / "run"
  pipeline.run_pipeline(cfg, work, layout(), until="prepare_corpus", progress=False)
  counts = pipeline.Run(cfg, work, layout(), progress=False).manifest("prepare_corpus")["counts"]
  assert counts["skipped_files"]["symlink_outside_root"] == 1 and counts["skipped_files"]["empty"] == 1
