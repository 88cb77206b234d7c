"""read_jsonl / write_jsonl_atomic: every record back in order, every bad line named by file and line."""
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from humpback_jax.data.jsonl import ReadStats, read_jsonl, write_jsonl_atomic
from humpback_jax.errors import DataError

GOOD = '{"instruction": "Say hi.", "output": "Hi!"}'


def write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_records_come_with_their_line_numbers(tmp_path):
  path = write_lines(tmp_path / "seed.jsonl", [GOOD, '{"instruction": "a", "output": "b"}'])
  assert list(read_jsonl(path, ["instruction", "output"])) == [
      (1, {"instruction": "Say hi.", "output": "Hi!"}), (2, {"instruction": "a", "output": "b"})]


def test_blank_lines_are_ignored_but_still_counted_in_line_numbers(tmp_path):
  path = write_lines(tmp_path / "seed.jsonl", ["", GOOD, "   ", "", GOOD])
  assert [line for line, _ in read_jsonl(path, ["output"])] == [2, 5]


def test_invalid_json_names_file_and_line(tmp_path):
  path = write_lines(tmp_path / "seed.jsonl", [GOOD, GOOD, '{"instruction": "a", "output": '])
  with pytest.raises(DataError, match=r"seed\.jsonl:3: invalid JSON") as error:
    list(read_jsonl(path, ["output"]))
  assert (error.value.line, error.value.path) == (3, path)


def test_missing_field_is_named(tmp_path):
  path = write_lines(tmp_path / "seed.jsonl", [GOOD, '{"instruction": "a"}'])
  with pytest.raises(DataError, match=r"seed\.jsonl:2: field 'output': missing") as error:
    list(read_jsonl(path, ["instruction", "output"]))
  assert error.value.field == "output"


def test_wrong_type_is_named_with_both_types(tmp_path):
  path = write_lines(tmp_path / "seed.jsonl", ['{"instruction": "a", "output": 17}'])
  with pytest.raises(DataError, match=r"seed\.jsonl:1: field 'output' must be a string, got int"):
    list(read_jsonl(path, ["instruction", "output"]))


def test_types_override_the_string_default(tmp_path):
  path = write_lines(tmp_path / "trees.jsonl", ['{"prompt": {"text": "hi"}}', '{"prompt": "hi"}'])
  with pytest.raises(DataError, match=r"trees\.jsonl:2: field 'prompt' must be an object, got str"):
    list(read_jsonl(path, ["prompt"], types={"prompt": dict}))


def test_a_line_that_is_not_an_object_is_an_error(tmp_path):
  path = write_lines(tmp_path / "seed.jsonl", ["[1, 2]"])
  with pytest.raises(DataError, match=r"seed\.jsonl:1: expected a JSON object, got list"):
    list(read_jsonl(path))


def test_non_utf8_bytes_name_file_line_and_byte_offset(tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(GOOD.encode() + b'\n{"output": "caf\xe9"}\n')
  with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8 at byte 59"):
    list(read_jsonl(path, ["output"]))


def test_a_utf8_byte_order_mark_is_tolerated(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
  assert [r["output"] for _, r in read_jsonl(path, ["output"])] == ["Hi!"]


def test_skip_mode_keeps_good_lines_and_counts_bad_ones_by_reason(tmp_path):
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(b"\n".join([
      GOOD.encode(), b"not json", b'{"instruction": "a"}', b'{"output": "\xff"}', b"[]",
      b'{"instruction": "a", "output": 3}', GOOD.encode()]) + b"\n")
  stats = ReadStats()
  records = list(read_jsonl(path, ["instruction", "output"], on_error="skip", stats=stats))
  assert [line for line, _ in records] == [1, 7]
  assert (stats.read, stats.skipped) == (2, 5)
  assert stats.reasons == {"invalid_json": 1, "missing:output": 1, "invalid_utf8": 1,
                           "not_an_object": 1, "wrong_type:output": 1}


def test_unknown_on_error_mode_is_refused(tmp_path):
  path = write_lines(tmp_path / "seed.jsonl", [GOOD])
  with pytest.raises(ValueError, match="on_error"):
    list(read_jsonl(path, on_error="ignore"))


def test_atomic_write_replaces_the_file_and_leaves_no_temp_files(tmp_path):
  path = write_lines(tmp_path / "out.jsonl", ['{"old": "x"}'])
  assert write_jsonl_atomic(path, [{"a": "é"}, {"b": 2}]) == 2
  assert path.read_text(encoding="utf-8") == '{"a": "é"}\n{"b": 2}\n'
  assert os.listdir(tmp_path) == ["out.jsonl"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
  path = write_lines(tmp_path / "out.jsonl", ['{"old": "x"}'])

  def records():
    yield {"new": "y"}
    raise RuntimeError("generator failed half way")

  with pytest.raises(RuntimeError):
    write_jsonl_atomic(path, records())
  assert path.read_text(encoding="utf-8") == '{"old": "x"}\n'
  assert os.listdir(tmp_path) == ["out.jsonl"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=8)
RECORDS = st.lists(st.dictionaries(st.text(), JSON_VALUES, max_size=4).map(lambda d: {**d, "text": "t"}),
                   max_size=8)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(RECORDS)
def test_written_records_are_read_back_all_and_in_order(tmp_path, records):
  path = tmp_path / "roundtrip.jsonl"
  write_jsonl_atomic(path, records)
  assert [record for _, record in read_jsonl(path, ["text"])] == records
