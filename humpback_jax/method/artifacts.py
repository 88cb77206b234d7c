"""The artifacts stages hand each other: file names, typed records, and the manifests that pin them.

Each stage writes into `workdir/<stage>/` and finishes with `manifest.json`: config hash, counts,
timing, and for every output its record count and sha256 (a model folder: each file's size and
sha256). A stage reads its inputs only through `Workdir.read`, which first checks the file
against the manifest of the stage that wrote it, so a shortened, edited or torn artifact stops
the run with a message naming the file and what differs; nothing is used unchecked.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from humpback_jax import shards
from humpback_jax.data.corpus import Segment  # the corpus's own record: a kept segment
from humpback_jax.errors import DataError

MANIFEST = "manifest.json"
SEED = "seed.jsonl"            # prepare_seed
SEGMENTS = "segments"          # prepare_corpus: the tfds dataset `workdir/datasets/segments`
CANDIDATES = "candidates.jsonl"  # augment
CANDIDATES_DATASET = "candidates"  # augment: the tfds dataset `workdir/datasets/candidates` (curate reads it)
SCORES = "scores.jsonl"        # curate_m{t}
CURATED = "curated.jsonl"      # curate_m{t}
MODEL = "model"                # pretrain, train_backward, train_m{t}
SHARDS = "shards"              # augment, curate_m{t}: generation shards (see humpback_jax/shards.py)


@dataclasses.dataclass(frozen=True)
class SeedPair:
  """A human-written (instruction, output) pair of the seed set."""
  id: str
  instruction: str
  output: str
  source: str = "seed"


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A backtranslated pair: the instruction M_yx wrote for a segment (None when empty or skipped)."""
  id: str
  instruction: str | None
  output: str
  header: str | None = ""
  status: str = "ok"  # ok | empty | skipped


@dataclasses.dataclass(frozen=True)
class Score:
  """The judge's rating of one candidate: parsed score (None: unparsable), or the expected score
  and the renormalised probabilities of "1".."5" in expected mode."""
  id: str
  score: int | None
  judge_output: str | None = None
  expected_score: float | None = None
  score_mass: float | None = None
  probs: list | None = None


@dataclasses.dataclass(frozen=True)
class CuratedPair:
  """A candidate kept by self-curation, with the score it was kept on."""
  id: str
  instruction: str
  output: str
  score: float | None = None
  header: str | None = ""


Record = TypeVar("Record", SeedPair, Segment, Candidate, Score, CuratedPair)


def from_dict(cls: type[Record], row: dict, where: str = "") -> Record:
  """A typed record from a JSON object; a missing or unknown field is a DataError naming `where`."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(row) - set(fields))
  if unknown:
    raise DataError(f"{where}: unknown field(s) {unknown} for a {cls.__name__}", field=unknown[0])
  missing = [n for n, f in fields.items() if n not in row and f.default is dataclasses.MISSING]
  if missing:
    raise DataError(f"{where}: field(s) {missing} missing for a {cls.__name__}", field=missing[0])
  return cls(**row)


def as_dict(record) -> dict:
  """A record as the JSON object written to disk (dicts pass through)."""
  return record if isinstance(record, dict) else dataclasses.asdict(record)


# ---------------------------------------------------------------------------- file digests


def folder_digest(folder: Path) -> dict:
  """{"files": {relative path: {"bytes", "sha256"}}} of every file under a folder (a model)."""
  files = {}
  for p in sorted(Path(folder).rglob("*")):
    if p.is_file():
      h = hashlib.sha256()
      with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
      files[str(p.relative_to(folder))] = dict(bytes=p.stat().st_size, sha256=h.hexdigest())
  return dict(files=files)


def dataset_digest(data_dir: Path, name: str) -> dict:
  """{"dataset", "records", "sha256"} of a tfds dataset's records in order (each as canonical JSON)."""
  return _records_digest(data_dir, name)[0]


def _records_digest(data_dir: Path, name: str):
  """The digest and the random-access source: one streaming pass, no record kept."""
  from humpback_jax.data import tfds_datasets
  h, records = hashlib.sha256(), 0
  source = tfds_datasets.read_dataset(data_dir, name)
  for row in source:
    h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    records += 1
  return dict(dataset=f"datasets/{name}", records=records, sha256=h.hexdigest()), source


class DatasetIds(collections.abc.Sequence):
  """The ids of a dataset's records in order, each read from the dataset when asked (never all held)."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} of {len(self)}")
    return self._source[index % len(self)]["id"]

  def __iter__(self):
    return (self[i] for i in range(len(self)))


class DatasetView:
  """A checked tfds dataset read by index: records typed as `cls` (fields outside it left out),
  loaded only when asked, so a process reads just its own shards; `ids` the same way."""

  def __init__(self, source, cls: type[Record], where: str):
    self._source, self._cls, self._where = source, cls, where
    self._fields = [f.name for f in dataclasses.fields(cls)]
    self.ids = DatasetIds(source)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    row = self._source[index]
    return from_dict(self._cls, {f: row[f] for f in self._fields if f in row}, f"{self._where} record {index}")

  def __iter__(self):
    return (self[i] for i in range(len(self)))


def check_file(path: Path, recorded: dict, writer: str) -> None:
  """Raises DataError naming the file when its count or sha256 differs from what `writer` recorded."""
  path = Path(path)
  if not path.exists():
    raise DataError(f"{path}: missing, but the {writer} manifest lists it; rerun with --from={writer}", path=path)
  found = shards.digest(path)
  if found != {k: recorded.get(k) for k in found}:
    raise DataError(f"{path}: has {found['records']} records (sha256 {found['sha256'][:12]}), but the {writer} "
                    f"manifest records {recorded.get('records')} (sha256 {str(recorded.get('sha256'))[:12]}); the "
                    f"file was changed after {writer} finished; rerun with --from={writer}", path=path)


def check_folder(folder: Path, recorded: dict, writer: str) -> None:
  """Raises DataError naming the first file of a model folder that is missing, extra or changed."""
  found = folder_digest(folder)["files"]
  want = recorded.get("files", {})
  for name in sorted(set(want) | set(found)):
    if found.get(name) != want.get(name):
      what = ("is missing" if name not in found else "is not in the manifest" if name not in want else
              f"has {found[name]['bytes']} bytes (sha256 {found[name]['sha256'][:12]}), the manifest records "
              f"{want[name]['bytes']} (sha256 {want[name]['sha256'][:12]})")
      raise DataError(f"{Path(folder) / name}: {what}; the {writer} output was changed after it finished; "
                      f"rerun with --from={writer}", path=Path(folder) / name)


# ---------------------------------------------------------------------------- records on disk


def write_records(path: Path, records: Iterable) -> dict:
  """Writes records as JSONL atomically; returns the file's digest for the manifest."""
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  shards.write_atomic(path, (as_dict(r) for r in records))
  return shards.digest(path)


def iter_records(path: Path, cls: type[Record]) -> Iterator[Record]:
  """The records of a JSONL artifact, typed, one at a time; a torn or malformed line names the file and line."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        row = json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not a complete JSON record ({e}); the file is torn or edited; "
                        "delete its stage folder and rerun", path=path, line=line_no) from None
      if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object", path=path, line=line_no)
      yield from_dict(cls, row, where)


def read_records(path: Path, cls: type[Record]) -> list[Record]:
  """Every record of a JSONL artifact, typed (see `iter_records`)."""
  return list(iter_records(path, cls))


# ---------------------------------------------------------------------------- manifests


def read_manifest(stage_dir: Path) -> dict | None:
  """A stage's manifest, None when the stage has not finished; invalid JSON names the file."""
  path = Path(stage_dir) / MANIFEST
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    return None
  try:
    manifest = json.loads(text)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({e}); delete it to run stage {Path(stage_dir).name} again",
                    path=path) from None
  if not isinstance(manifest, dict) or "config_hash" not in manifest:
    raise DataError(f"{path}: not a stage manifest (no config_hash); delete it to run the stage again", path=path)
  return manifest


def write_manifest(stage_dir: Path, *, stage: str, config_hash: str, counts: dict, outputs: dict,
                   seconds: float, selection: dict | None = None) -> dict:
  """Writes a finished stage's manifest atomically; `outputs` maps file name -> digest; `selection` is
  the threshold the stage's inputs were curated at (None before curation)."""
  manifest = dict(stage=stage, config_hash=config_hash, selection=selection, counts=counts, outputs=outputs,
                  seconds=round(seconds, 2), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
  shards.write_json_atomic(Path(stage_dir) / MANIFEST, manifest)
  return manifest


class Workdir:
  """A run's folder: where each stage's artifacts live, and checked reads of them."""

  def __init__(self, root: Path):
    self.root = Path(root)

  def stage(self, name: str) -> Path:
    return self.root / name

  def manifest(self, name: str) -> dict | None:
    return read_manifest(self.stage(name))

  def finished(self, writer: str) -> dict:
    manifest = self.manifest(writer)
    if manifest is None:
      raise DataError(f"{self.stage(writer)}: stage {writer} has not finished (no {MANIFEST}); run it first "
                      f"(--from={writer})", path=self.stage(writer))
    return manifest

  def _recorded(self, writer: str, name: str) -> dict:
    outputs = self.finished(writer).get("outputs") or {}
    if name not in outputs:
      path = self.stage(writer) / MANIFEST
      raise DataError(f"{path}: records no output {name!r} (written by an older version?); rerun with "
                      f"--from={writer}", path=path)
    return outputs[name]

  def checked(self, writer: str, name: str) -> Path:
    """The path of `writer`'s output `name`, after checking the file against its manifest."""
    path = self.stage(writer) / name
    check_file(path, self._recorded(writer, name), writer)
    return path

  def read(self, writer: str, name: str, cls: type[Record]) -> list[Record]:
    """The records of `writer`'s output `name`, after checking them against its manifest."""
    return read_records(self.checked(writer, name), cls)

  def read_dataset(self, writer: str, name: str, cls: type[Record]) -> DatasetView:
    """The tfds dataset `writer` prepared, checked against its manifest in one streaming pass, as a
    view whose records load by index (never the whole dataset in memory)."""
    recorded = self._recorded(writer, name)
    found, source = _records_digest(self.root / "datasets", name)
    if (found["records"], found["sha256"]) != (recorded.get("records"), recorded.get("sha256")):
      raise DataError(f"{self.root / found['dataset']}: holds {found['records']} records (sha256 "
                      f"{found['sha256'][:12]}), but the {writer} manifest records {recorded.get('records')} (sha256 "
                      f"{str(recorded.get('sha256'))[:12]}); rerun with --from={writer}", path=self.root / found["dataset"])
    return DatasetView(source, cls, str(self.root / found["dataset"]))

  def model(self, writer: str) -> Path:
    """`writer`'s model folder, after checking every file against its manifest."""
    folder = self.stage(writer) / MODEL
    check_folder(folder, self._recorded(writer, MODEL), writer)
    return folder

  def read_if_finished(self, writer: str, name: str, cls: type[Record]) -> list[Record]:
    """Checked records of `writer`'s output, or [] when that stage has not finished (a partial run's report)."""
    return [] if self.manifest(writer) is None else self.read(writer, name, cls)

