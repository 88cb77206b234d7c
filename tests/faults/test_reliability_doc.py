"""RELIABILITY.md promises only what a test proves: every guarantee row names tests that exist."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITE = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)`")


def functions_of(path: Path) -> set[str]:
  return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


def guarantee_rows():
  """(line, [(file, test)]) of every table row of RELIABILITY.md; `::name` continues the row's last file."""
  for line in (ROOT / "RELIABILITY.md").read_text(encoding="utf-8").splitlines():
    if not line.startswith("|") or set(line) <= set("|- ") or line.startswith("| guarantee"):
      continue
    cited, file = [], None
    for m in CITE.finditer(line):
      file = m[1] or file
      cited.append((file, m[2]))
    yield line, cited


def test_every_guarantee_names_a_test_that_exists():
  rows = list(guarantee_rows())
  assert len(rows) > 30
  for line, cited in rows:
    assert cited and cited[0][0], f"RELIABILITY.md: a guarantee without its test: {line[:120]}"
    for file, name in cited:
      assert (ROOT / file).exists() and name in functions_of(ROOT / file), f"RELIABILITY.md cites {file}::{name}, which does not exist"
