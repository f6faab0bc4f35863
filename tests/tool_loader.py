"""Import a script of tools/ or benchmarks/ as a module, for tests that call its functions
or main()."""
import importlib
import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
BENCHMARKS = TOOLS.parent / "benchmarks"


def _load_script(folder, name, prefix):
    """<folder>/<name>.py as a fresh module, with `folder` on sys.path first, as when the
    script runs: scripts import their neighbours by name."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"{prefix}{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name):
    """tools/<name>.py as a fresh module (the tools import their helpers, cli_args and
    demo_core, by name)."""
    return _load_script(TOOLS, name, "_tool_")


def load_benchmark(name):
    """benchmarks/<name>.py as a fresh module (benchmarks import each other by name)."""
    return _load_script(BENCHMARKS, name, "_bench_")


def tool_helper(name):
    """A helper module of the tools (e.g. demo_core), the one instance the tools import."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)
