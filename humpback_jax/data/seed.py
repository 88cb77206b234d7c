"""Seed data: (instruction, output) pairs from OASST1 trees, OASST1 flat messages, or plain pairs.

The paper's rule (METHOD.md): the first turn of each tree, English, the rank-0 (best) reply.
- Prompt: the tree's root prompter message; skipped when deleted (`deleted` true), rejected by
  review (`review_result` false) or not in `lang`.
- Output: the reply ranked 0, and only that one. A tree whose replies are ranked 1 and 2, or that
  has one unranked reply, yields nothing: no reply was judged best. When the rank-0 reply is
  deleted, rejected by review or not in `lang` the tree yields nothing either (the next-ranked
  reply is not the best). Two rank-0 replies (the paper leaves ties open) go to the earliest in
  file order. A reply without a `lang` field is taken to share the prompt's.
- Every skipped tree is counted under one reason (`SKIP_REASONS`), reported in the manifest.
- Choosing N: each candidate gets the key blake2b(f"{seed}:{id}"); the N smallest keys are kept,
  returned in file order. A candidate's fate depends only on its own id, so the set chosen for N
  contains the set chosen for any smaller N, and adding records elsewhere changes no key.
Examples are `{"id", "instruction", "output", "source": "seed"}`; the text is kept as written.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Iterable, Sequence

from humpback_jax.data.jsonl import ReadStats, read_jsonl
from humpback_jax.errors import DataError

FORMATS = ("auto", "oasst_trees", "oasst_messages", "pairs")
# Why a tree gave no example, checked in this order ("not_<lang>" stands for the prompt's language).
SKIP_REASONS = ("prompt_deleted", "prompt_rejected", "not_<lang>", "no_reply", "no_rank_0_reply",
                "reply_deleted", "reply_rejected", "reply_not_<lang>", "empty_instruction", "empty_output")
PAPER_SEED_SIZE = 3200


@dataclasses.dataclass
class SeedStats:
  """What loading the seed did: candidates found, records skipped by reason, examples selected."""
  candidates: int = 0
  selected: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  read: ReadStats = dataclasses.field(default_factory=ReadStats)

  def as_dict(self) -> dict:
    """Plain JSON-ready counts, for stage manifests."""
    return {"records_read": self.read.read, "lines_skipped": self.read.skipped,
            "line_errors": dict(self.read.reasons), "candidates": self.candidates,
            "skipped": dict(self.skipped), "selected": self.selected}


def load_seed(path, fmt: str = "auto", n: int | None = PAPER_SEED_SIZE, *, lang: str = "en",
              seed: int = 0, on_error: str = "raise") -> tuple[list[dict], dict]:
  """(examples, counts) from `path` in format `fmt` ("auto" peeks at the first record), N chosen by
  `seed`. `n=None` keeps every candidate, as does an `n` above their number (counts["selected"])."""
  if fmt not in FORMATS:
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
  fmt = detect_format(path) if fmt == "auto" else fmt
  stats = SeedStats()
  if fmt == "pairs":
    examples = load_pairs_jsonl(path, n, seed=seed, on_error=on_error, stats=stats)
  else:
    loader = load_oasst_trees if fmt == "oasst_trees" else load_oasst_messages
    examples = loader(path, n, lang=lang, seed=seed, on_error=on_error, stats=stats)
  return examples, {"format": fmt, **stats.as_dict()}


def detect_format(path) -> str:
  """"oasst_trees", "oasst_messages" or "pairs", from the keys of the first non-blank record."""
  for line_number, record in read_jsonl(path):
    if "prompt" in record and isinstance(record["prompt"], dict):
      return "oasst_trees"
    if "message_id" in record and "parent_id" in record:
      return "oasst_messages"
    if "instruction" in record and "output" in record:
      return "pairs"
    raise DataError(f"{path}:{line_number}: cannot tell the seed format from keys {sorted(record)[:8]}; "
                    "expected 'prompt' (OASST trees), 'message_id'+'parent_id' (OASST messages) or "
                    "'instruction'+'output' (pairs); or pass fmt=", path=path, line=line_number)
  raise DataError(f"{path}: no records; the seed file is empty", path=path)


def load_oasst_trees(path, n: int | None = PAPER_SEED_SIZE, *, lang: str = "en", seed: int = 0,
                     on_error: str = "raise", stats: SeedStats | None = None) -> list[dict]:
  """First turns of OASST1 `*.trees.jsonl` trees in `lang`: prompt text and its best reply."""
  stats = stats if stats is not None else SeedStats()
  candidates = []
  for line_number, tree in read_jsonl(path, ["prompt"], types={"prompt": dict}, on_error=on_error,
                                      stats=stats.read):
    prompt = tree["prompt"]
    where = f"{path}:{line_number}"
    for field in ("text", "lang"):
      if not isinstance(prompt.get(field), str):
        raise DataError(f"{where}: field 'prompt.{field}' must be a string, got "
                        f"{type(prompt.get(field)).__name__}", path=path, line=line_number,
                        field=f"prompt.{field}")
    replies = prompt.get("replies") or []
    if not isinstance(replies, list) or not all(isinstance(r, dict) for r in replies):
      raise DataError(f"{where}: field 'prompt.replies' must be a list of objects", path=path,
                      line=line_number, field="prompt.replies")
    message_id = prompt.get("message_id") or tree.get("message_tree_id")
    example_id = f"seed-{message_id}" if message_id else f"seed-{line_number:06d}"
    candidates.append(_first_turn(example_id, prompt, replies, lang, stats))
  return _select([c for c in candidates if c is not None], n, seed, stats, path)


def load_oasst_messages(path, n: int | None = PAPER_SEED_SIZE, *, lang: str = "en", seed: int = 0,
                        on_error: str = "raise", stats: SeedStats | None = None) -> list[dict]:
  """First turns from OASST1 flat messages: root prompter messages and their best assistant child."""
  stats = stats if stats is not None else SeedStats()
  roots, children = [], collections.defaultdict(list)
  types = {"parent_id": (str, type(None))}
  for _, message in read_jsonl(path, ["message_id", "parent_id", "role", "text"], types=types,
                               on_error=on_error, stats=stats.read):
    if message["parent_id"] is None:
      if message["role"] == "prompter":
        roots.append(message)
      else:
        stats.skipped["root_not_prompter"] += 1
    else:
      children[message["parent_id"]].append(message)
  candidates = (_first_turn(f"seed-{root['message_id']}", root, children[root["message_id"]], lang,
                            stats) for root in roots)
  return _select([c for c in candidates if c is not None], n, seed, stats, path)


def load_pairs_jsonl(path, n: int | None = None, *, seed: int = 0, on_error: str = "raise",
                     stats: SeedStats | None = None) -> list[dict]:
  """Plain `{"instruction", "output"}` JSONL (an optional string `id` is kept) as seed examples."""
  stats = stats if stats is not None else SeedStats()
  candidates = []
  for line_number, record in read_jsonl(path, ["instruction", "output"], on_error=on_error,
                                        stats=stats.read):
    example_id = record.get("id")
    if not isinstance(example_id, str) or not example_id:
      example_id = f"seed-{line_number:06d}"
    example = _example(example_id, record["instruction"], record["output"], stats)
    if example is not None:
      candidates.append(example)
  return _select(candidates, n, seed, stats, path)


def _first_turn(example_id: str, prompt: dict, replies: Sequence[dict], lang: str,
                stats: SeedStats) -> dict | None:
  """The (prompt, rank-0 reply) example, or None with the reason counted in `stats.skipped`."""
  reason = _prompt_problem(prompt, lang)
  reply = None
  if reason is None:
    reply, reason = rank_0_reply(replies, lang)
  if reason is not None:
    stats.skipped[reason] += 1
    return None
  return _example(example_id, prompt["text"], reply.get("text"), stats)


def _prompt_problem(prompt: dict, lang: str) -> str | None:
  if prompt.get("deleted"):
    return "prompt_deleted"
  if prompt.get("review_result") is False:
    return "prompt_rejected"
  if prompt.get("lang") != lang:
    return "not_" + lang
  return None


def rank_0_reply(replies: Iterable[dict], lang: str = "en") -> tuple[dict | None, str | None]:
  """(the rank-0 assistant reply, None), or (None, why not): "no_reply", "no_rank_0_reply", or the
  rank-0 reply's own fault ("reply_deleted", "reply_rejected", "reply_not_<lang>")."""
  answers = [r for r in replies if r.get("role", "assistant") == "assistant"]
  if not answers:
    return None, "no_reply"
  best = [r for r in answers if _is_rank(r.get("rank")) and r["rank"] == 0]
  if not best:
    return None, "no_rank_0_reply"
  reason = None
  for reply in best:  # file order: the earliest usable rank-0 reply wins a tie
    if reply.get("deleted"):
      reason = reason or "reply_deleted"
    elif reply.get("review_result") is False:
      reason = reason or "reply_rejected"
    elif reply.get("lang", lang) != lang:
      reason = reason or "reply_not_" + lang
    else:
      return reply, None
  return None, reason


def _is_rank(rank) -> bool:
  """A number that is not NaN (flat exports store ranks as floats, missing ones as NaN)."""
  return isinstance(rank, (int, float)) and not isinstance(rank, bool) and rank == rank


def _example(example_id: str, instruction, output, stats: SeedStats) -> dict | None:
  for field, value in (("instruction", instruction), ("output", output)):
    if not isinstance(value, str) or not value.strip():
      stats.skipped[f"empty_{field}"] += 1
      return None
  return {"id": example_id, "instruction": instruction, "output": output, "source": "seed"}


def _select(candidates: list[dict], n: int | None, seed: int, stats: SeedStats, path) -> list[dict]:
  """The `n` candidates with the smallest seeded id hash, in file order; duplicate ids are an error."""
  seen = set()
  for example in candidates:
    if example["id"] in seen:
      raise DataError(f"{path}: id {example['id']!r} appears twice; seed ids must be unique "
                      "(fix or drop the repeated record)", path=path, field="id")
    seen.add(example["id"])
  stats.candidates += len(candidates)
  if n is not None and n < len(candidates):
    order = sorted(range(len(candidates)), key=lambda i: (_selection_key(seed, candidates[i]["id"]), i))
    keep = set(order[:n])
    candidates = [c for i, c in enumerate(candidates) if i in keep]
  stats.selected += len(candidates)
  return candidates


def _selection_key(seed: int, example_id: str) -> bytes:
  return hashlib.blake2b(f"{seed}:{example_id}".encode("utf-8"), digest_size=8).digest()

