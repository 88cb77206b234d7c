"""The package's shape: imports flow one way down the layers below, with no circle (a lazy import
inside a function counts too), and no source file grows past what a reader takes in at once."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "humpback_jax"

# Lowest first. A module may import its own layer or a lower one, never a higher one. A module of a
# subpackage takes its subpackage's layer; a new top-level module or subpackage must be placed here.
LAYERS = (
    ("base", ("errors", "user_errors", "xla_flags", "chips", "malloc_env", "distributed", "metrics_log", "shards",
              "assets_fetch", "workdir_lock", "quiet", "tokenizer", "prompts", "kernels")),
    ("config", ("config", "configlib", "sharding")),
    ("model", ("model",)),
    ("checkpoints and data", ("checkpoints", "data")),
    ("engines", ("train", "train_loop", "generate", "engine", "plan", "aot")),
    ("api", ("api",)),
    ("method", ("method",)),
    ("entry points", ("cli", "tools", "__init__")),
)
LAYER_OF = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}
MAX_PYTHON_LINES = 500
MAX_KERNEL_LINES = 600


def module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
  """Our modules that `path` imports anywhere in its body (top level or inside functions)."""
  package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import mod` imports pkg.mod when that is a module; else a name of pkg.
      found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
  modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
  return {name for name in found if name in modules and name != module_name(path)}


def layer(module: str) -> int:
  parts = module.split(".")
  key = parts[1] if len(parts) > 1 else "__init__"
  assert key in LAYER_OF, (f"{module}: not placed in a layer; add {key!r} to LAYERS in "
                           "tests/test_layering.py at the lowest layer whose modules it needs")
  return LAYER_OF[key]


def import_graph() -> dict[str, set[str]]:
  return {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_from_a_higher_layer():
  upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
            for m, deps in import_graph().items() for d in sorted(deps)
            if d != "humpback_jax" and layer(d) > layer(m)]
  assert not upward, "upward imports:\n" + "\n".join(upward)


def test_imports_form_no_circle():
  graph = import_graph()
  graph = {m: {d for d in deps if d != "humpback_jax"} for m, deps in graph.items()}  # the package root
  state, circles = {}, []

  def visit(module, path):
    state[module] = "open"
    for dep in sorted(graph.get(module, ())):
      if state.get(dep) == "open":
        circles.append(" -> ".join(path[path.index(dep):] + [dep]))
      elif dep not in state:
        visit(dep, path + [dep])
    state[module] = "done"

  for module in graph:
    if module not in state:
      visit(module, [module])
  assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_walk_sees_imports_inside_functions():
  # The checks above are only as good as the walk: an import inside a function must be seen.
  deps = imported_modules(PACKAGE / "__init__.py")
  assert "humpback_jax.api" in deps and "humpback_jax.xla_flags" in deps


def test_no_python_file_is_over_500_lines():
  long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted(ROOT.glob("**/*.py"))
          if ".git" not in p.parts and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_PYTHON_LINES]
  assert not long, f"split these into modules of one job each (<= {MAX_PYTHON_LINES} lines):\n" + "\n".join(long)


def test_no_kernel_source_is_over_600_lines():
  sources = sorted([*PACKAGE.glob("kernels/*.cc"), *PACKAGE.glob("kernels/*.h")])
  assert len(sources) >= 5  # one file per family, not one file for all
  long = [f"{p.name}: {n} lines" for p in sources if (n := len(p.read_text().splitlines())) > MAX_KERNEL_LINES]
  assert not long, "split these kernel files by family:\n" + "\n".join(long)
