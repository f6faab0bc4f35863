"""Import a script of tools/ as a module, for tests that call its functions or main()."""
import importlib
import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name):
    """tools/<name>.py as a fresh module. tools/ goes on sys.path first, as when a tool
    runs as a script: the tools import their helpers (cli_args, demo_core) by name."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    path = TOOLS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_helper(name):
    """A helper module of the tools (e.g. demo_core), the one instance the tools import."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)
