"""The docs stay what they are for: README.md for users, bench/RESULTS.md the current tables (each
with the command that reproduces it), kernel internals beside the kernels."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"`(python3? |humpback |bash |JAX_|HUMPBACK_)[^`]*`")


def sections(text: str):
  """(heading, body) of every `## ` section."""
  parts = re.split(r"^## (.*)$", text, flags=re.M)
  return list(zip(parts[1::2], parts[2::2]))


def test_results_stay_under_15_kb():
  size = len((ROOT / "bench" / "RESULTS.md").read_bytes())
  assert size < 15_000, f"bench/RESULTS.md is {size} bytes: keep the current table per benchmark (history is in git)"


def test_every_results_table_names_the_command_that_made_it():
  for heading, body in sections((ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")):
    if re.search(r"^\|.*\|$", body, flags=re.M):
      assert COMMAND.search(body), f"bench/RESULTS.md '{heading}': a table without the command that made it"


def test_readme_has_no_kernel_internals():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  internals = [word for word in ("AVX", "GEMM", "VNNI", "FMA", "strip", "tile") if word in readme]
  assert not internals, f"README.md mentions {internals}: kernel internals go in humpback_jax/kernels/README.md"
  assert (ROOT / "humpback_jax" / "kernels" / "README.md").exists()
