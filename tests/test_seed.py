"""Seed loading: first turn of each OASST1 tree, English, the rank-0 reply only, N chosen deterministically."""
import json

import pytest

from humpback_jax.data.seed import (SeedStats, detect_format, load_oasst_messages, load_oasst_trees,
                                    load_pairs_jsonl, load_seed, rank_0_reply)
from humpback_jax.errors import DataError


def reply(text, rank, **extra):
  return {"message_id": f"r-{text}", "role": "assistant", "lang": "en", "text": text, "rank": rank,
          "replies": [], **extra}


def tree(tree_id, prompt_text, replies, lang="en", **extra):
  return {"message_tree_id": tree_id, "tree_state": "ready_for_export",
          "prompt": {"message_id": tree_id, "role": "prompter", "lang": lang, "text": prompt_text,
                     "replies": replies, **extra}}


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


@pytest.fixture
def trees_path(tmp_path):
  return write_jsonl(tmp_path / "oasst1.trees.jsonl", [
      tree("t1", "What is a monad?", [
          reply("second best", 1),
          reply("best", 0, replies=[{"role": "prompter", "text": "follow-up question", "replies": []}]),
      ]),
      tree("t2", "Qu'est-ce qu'une monade ?", [reply("une réponse", 0, lang="fr")], lang="fr"),
      tree("t3", "Name a prime.", [reply("7", 0)]),
      tree("t4", "Empty answer?", [reply("   ", 0)]),
  ])


def messages_from_trees(trees):
  """The same data in OASST1's flat form: children listed before parents, as in real exports."""
  messages = []
  flags = ("deleted", "review_result")
  for t in trees:
    prompt = t["prompt"]
    for r in prompt["replies"]:
      rank = float("nan") if r["rank"] is None else float(r["rank"])  # as pandas-made exports store it
      messages.append({"message_id": r["message_id"] + t["message_tree_id"], "parent_id": prompt["message_id"],
                       "role": "assistant", "lang": r["lang"], "rank": rank, "text": r["text"],
                       "message_tree_id": t["message_tree_id"], **{f: r[f] for f in flags if f in r}})
    messages.append({"message_id": prompt["message_id"], "parent_id": None, "role": "prompter",
                     "lang": prompt["lang"], "rank": None, "text": prompt["text"],
                     "message_tree_id": t["message_tree_id"], **{f: prompt[f] for f in flags if f in prompt}})
  return messages


def test_trees_give_the_first_turn_with_the_rank_0_reply(trees_path):
  examples = load_oasst_trees(trees_path, n=None)
  assert examples[0] == {"id": "seed-t1", "instruction": "What is a monad?", "output": "best",
                         "source": "seed"}


def test_only_prompts_in_the_requested_language_are_kept(trees_path):
  stats = SeedStats()
  examples = load_oasst_trees(trees_path, n=None, stats=stats)
  assert [e["id"] for e in examples] == ["seed-t1", "seed-t3"]
  assert stats.skipped["not_en"] == 1
  assert [e["id"] for e in load_oasst_trees(trees_path, n=None, lang="fr")] == ["seed-t2"]


def test_empty_outputs_are_skipped_and_counted(trees_path):
  stats = SeedStats()
  load_oasst_trees(trees_path, n=None, stats=stats)
  assert stats.skipped["empty_output"] == 1
  assert (stats.candidates, stats.selected) == (2, 2)


def test_only_the_rank_0_reply_is_ever_chosen():
  assert rank_0_reply([reply("second", 1), reply("best", 0), reply("third", 2)]) == (reply("best", 0), None)
  assert rank_0_reply([reply("second", 1), reply("third", 2)]) == (None, "no_rank_0_reply")


def test_a_lone_unranked_reply_is_not_the_best_reply():
  assert rank_0_reply([reply("only", None)]) == (None, "no_rank_0_reply")
  assert rank_0_reply([]) == (None, "no_reply")


def test_a_deleted_rejected_or_foreign_rank_0_reply_is_not_replaced_by_the_next_rank():
  assert rank_0_reply([reply("gone", 0, deleted=True), reply("next", 1)]) == (None, "reply_deleted")
  assert rank_0_reply([reply("bad", 0, review_result=False), reply("next", 1)]) == (None, "reply_rejected")
  assert rank_0_reply([reply("hola", 0, lang="es"), reply("next", 1)]) == (None, "reply_not_en")


def test_equal_rank_0_replies_go_to_the_earliest_usable_one():
  assert rank_0_reply([reply("first", 0), reply("second", 0)])[0]["text"] == "first"
  assert rank_0_reply([reply("first", 0, deleted=True), reply("second", 0)])[0]["text"] == "second"


def test_float_ranks_from_flat_exports_are_ranks_and_nan_is_missing():
  assert rank_0_reply([reply("nan", float("nan")), reply("one", 1.0), reply("zero", 0.0)])[0]["text"] == "zero"


TREES_WITH_EVERY_SKIP = [
    tree("ok", "Name a prime.", [reply("7", 0), reply("11", 1)]),
    tree("ranks12", "Name a colour.", [reply("red", 1), reply("blue", 2)]),
    tree("unranked", "Name a fruit.", [reply("apple", None)]),
    tree("noreply", "Anyone there?", []),
    tree("pdel", "Deleted prompt", [reply("a", 0)], deleted=True),
    tree("prej", "Rejected prompt", [reply("a", 0)], review_result=False),
    tree("fr", "Nomme un nombre premier.", [reply("7", 0)], lang="fr"),
    tree("rdel", "Name a metal.", [reply("iron", 0, deleted=True), reply("tin", 1)]),
    tree("rrej", "Name a gas.", [reply("argon", 0, review_result=False), reply("neon", 1)]),
    tree("rlang", "Name a river.", [reply("el Ebro", 0, lang="es"), reply("the Nile", 1)]),
    tree("ok2", "Name a planet.", [reply("Mars", 0, review_result=True, deleted=False)],
         review_result=True, deleted=False),
]
EVERY_SKIP_COUNTED = {"no_rank_0_reply": 2, "no_reply": 1, "prompt_deleted": 1, "prompt_rejected": 1,
                      "not_en": 1, "reply_deleted": 1, "reply_rejected": 1, "reply_not_en": 1}


def test_trees_skip_every_unusable_first_turn_and_count_each_reason(tmp_path):
  examples, counts = load_seed(write_jsonl(tmp_path / "t.trees.jsonl", TREES_WITH_EVERY_SKIP), n=None)
  assert [(e["id"], e["output"]) for e in examples] == [("seed-ok", "7"), ("seed-ok2", "Mars")]
  assert counts["skipped"] == EVERY_SKIP_COUNTED
  assert (counts["candidates"], counts["selected"]) == (2, 2)


def test_both_oasst_forms_give_the_same_examples_and_counts(tmp_path):
  trees_counts = load_seed(write_jsonl(tmp_path / "t.trees.jsonl", TREES_WITH_EVERY_SKIP), n=None)
  messages = messages_from_trees(TREES_WITH_EVERY_SKIP)
  messages_counts = load_seed(write_jsonl(tmp_path / "m.messages.jsonl", messages), n=None)
  assert messages_counts[1]["format"] == "oasst_messages"
  assert trees_counts[0] == messages_counts[0]
  assert messages_counts[1]["skipped"] == EVERY_SKIP_COUNTED


def test_messages_form_gives_the_same_examples_as_trees(tmp_path, trees_path):
  trees = [json.loads(line) for line in trees_path.read_text().splitlines()]
  messages_path = write_jsonl(tmp_path / "oasst1.messages.jsonl", messages_from_trees(trees))
  from_messages = load_oasst_messages(messages_path, n=None)
  assert [(e["id"], e["instruction"], e["output"]) for e in from_messages] == [
      (e["id"], e["instruction"], e["output"]) for e in load_oasst_trees(trees_path, n=None)]


def test_messages_with_a_bad_parent_id_name_the_line_and_field(tmp_path):
  path = write_jsonl(tmp_path / "messages.jsonl", [
      {"message_id": "m1", "parent_id": None, "role": "prompter", "text": "hi", "lang": "en"},
      {"message_id": "m2", "parent_id": 7, "role": "assistant", "text": "hello", "lang": "en"}])
  with pytest.raises(DataError, match=r"messages\.jsonl:2: field 'parent_id' must be a string or null, got int"):
    load_oasst_messages(path)


def test_a_tree_without_prompt_text_names_the_nested_field(tmp_path):
  path = write_jsonl(tmp_path / "trees.jsonl", [{"prompt": {"lang": "en", "replies": []}}])
  with pytest.raises(DataError, match=r"trees\.jsonl:1: field 'prompt\.text' must be a string"):
    load_oasst_trees(path)


@pytest.fixture
def many_pairs_path(tmp_path):
  return write_jsonl(tmp_path / "pairs.jsonl",
                     [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(50)])


def test_choosing_n_is_deterministic_and_in_file_order(many_pairs_path):
  first = load_pairs_jsonl(many_pairs_path, n=10, seed=3)
  assert first == load_pairs_jsonl(many_pairs_path, n=10, seed=3)
  lines = [int(e["id"].removeprefix("seed-")) for e in first]
  assert len(first) == 10 and lines == sorted(lines)


def test_the_seed_changes_which_examples_are_chosen(many_pairs_path):
  ids = {seed: {e["id"] for e in load_pairs_jsonl(many_pairs_path, n=10, seed=seed)} for seed in (0, 1)}
  assert ids[0] != ids[1]


def test_a_larger_n_keeps_every_example_a_smaller_n_chose(many_pairs_path):
  small = {e["id"] for e in load_pairs_jsonl(many_pairs_path, n=10)}
  large = {e["id"] for e in load_pairs_jsonl(many_pairs_path, n=30)}
  assert small < large


def test_n_larger_than_the_candidates_keeps_them_all(many_pairs_path):
  stats = SeedStats()
  assert len(load_pairs_jsonl(many_pairs_path, n=3200, stats=stats)) == 50
  assert (stats.candidates, stats.selected) == (50, 50)


def test_pairs_keep_their_own_ids_and_repeated_ids_are_an_error(tmp_path):
  path = write_jsonl(tmp_path / "pairs.jsonl", [{"id": "a", "instruction": "q", "output": "x"},
                                                 {"id": "a", "instruction": "q2", "output": "y"}])
  with pytest.raises(DataError, match=r"pairs\.jsonl: id 'a' appears twice"):
    load_pairs_jsonl(path)


def test_pairs_with_an_empty_instruction_are_skipped_and_counted(tmp_path):
  path = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "", "output": "x"},
                                                 {"instruction": "q", "output": "y"}])
  stats = SeedStats()
  assert [e["id"] for e in load_pairs_jsonl(path, stats=stats)] == ["seed-000002"]
  assert stats.skipped == {"empty_instruction": 1}


def test_auto_detects_each_format_from_the_first_record(tmp_path, trees_path, many_pairs_path):
  trees = [json.loads(line) for line in trees_path.read_text().splitlines()]
  messages_path = write_jsonl(tmp_path / "messages.jsonl", messages_from_trees(trees))
  assert [detect_format(p) for p in (trees_path, messages_path, many_pairs_path)] == [
      "oasst_trees", "oasst_messages", "pairs"]
  assert load_seed(trees_path, n=None)[0] == load_oasst_trees(trees_path, n=None)
  assert load_seed(many_pairs_path, n=5)[0] == load_pairs_jsonl(many_pairs_path, n=5)
  assert load_seed(messages_path, n=None)[1]["format"] == "oasst_messages"


def test_auto_detection_skips_leading_blank_lines(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text('\n\n{"instruction": "q", "output": "a"}\n', encoding="utf-8")
  assert detect_format(path) == "pairs"


def test_an_unknown_format_names_the_file_and_what_was_expected(tmp_path):
  path = write_jsonl(tmp_path / "other.jsonl", [{"question": "q", "answer": "a"}])
  with pytest.raises(DataError, match=r"other\.jsonl:1: cannot tell the seed format .*'instruction'\+'output'"):
    load_seed(path)


def test_load_seed_reports_json_ready_counts(trees_path):
  examples, counts = load_seed(trees_path, n=1)
  assert counts == {"format": "oasst_trees", "records_read": 4, "lines_skipped": 0, "line_errors": {},
                    "candidates": 2, "skipped": {"not_en": 1, "empty_output": 1}, "selected": 1}
  assert json.loads(json.dumps(counts)) == counts and len(examples) == 1


def test_load_seed_skip_mode_counts_bad_lines(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text('{"instruction": "q", "output": "a"}\nnot json\n', encoding="utf-8")
  examples, counts = load_seed(path, n=None, on_error="skip")
  assert len(examples) == 1 and counts["line_errors"] == {"invalid_json": 1}


def test_the_prepare_seed_manifest_counts_each_skip_reason(tmp_path):
  from helpers import layout
  from humpback_jax import configlib
  from humpback_jax.method import artifacts, pipeline
  seed_path = write_jsonl(tmp_path / "oasst.trees.jsonl", TREES_WITH_EVERY_SKIP)
  cfg = configlib.load_config("configs/toy.py", [f"--config.data.seed_path={seed_path}"])
  pipeline.run_pipeline(cfg, tmp_path / "run", layout(), until="prepare_seed", progress=False)
  counts = artifacts.read_manifest(tmp_path / "run" / "prepare_seed")["counts"]
  assert counts["skipped"] == EVERY_SKIP_COUNTED and counts["seed_pairs"] == 2
