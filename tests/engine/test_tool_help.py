"""Every tool answers --help (and a usage error) at once: it parses its arguments before
torch, detectron2 or cpr_d2 is imported, and prints no framework warnings."""
import subprocess
import sys
import time

import pytest

from tests.tool_loader import TOOLS, load_tool

TOOL_NAMES = ("train_net", "refine_export", "run_pipeline", "demo", "predict", "export_model",
              "evaluate_points", "make_coarse", "semantic_variance", "visualize_cpr",
              "calibrate_count")

# Runs the tool as a script with `argv`, then reports which heavy modules it imported.
_PROBE = """
import runpy, sys
sys.argv = [{path!r}] + {argv!r}
sys.path.insert(0, {tools!r})
try:
    runpy.run_path({path!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "detectron2", "cpr_d2") if m in sys.modules)
print("EXIT", code, "HEAVY", ",".join(heavy) or "none", file=sys.stderr)
"""


def _probe(name, argv):
    path = str(TOOLS / f"{name}.py")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(path=path, argv=argv,
                                                               tools=str(TOOLS))],
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("name", TOOL_NAMES)
def test_help_imports_nothing_heavy(name):
    proc, seconds = _probe(name, ["--help"])
    assert "EXIT 0 HEAVY none" in proc.stderr, proc.stderr
    assert "usage:" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr
    assert seconds < 10  # about 0.1 s on a quiet 2-core machine; a loaded one is slower


@pytest.mark.parametrize("name, argv, message", [
    ("train_net", ["--num-gpus", "two"], "--num-gpus: invalid int value"),
    ("refine_export", ["--dataset", "forest"], "the following arguments are required: --output"),
    ("demo", ["--max-size", "0"], "--max-size must be positive"),
    ("visualize_cpr", ["--output", "x"], "the following arguments are required: --dataset"),
])
def test_usage_errors_answer_before_the_imports(name, argv, message):
    proc, _ = _probe(name, argv)
    assert "EXIT 2 HEAVY none" in proc.stderr, proc.stderr
    assert message in proc.stderr


def test_written_out_defaults_equal_the_package_constants():
    from cpr_d2.engine.launch import BACKENDS
    from cpr_d2.evaluation.semantic_variance import DEFAULT_SIZE_RANGES

    assert load_tool("cli_args").BACKENDS == BACKENDS
    from cpr_d2.engine import trust

    assert load_tool("cli_args").KEEP_UNRELIABLE == trust.KEEP_UNRELIABLE
    assert load_tool("cli_args").DEFAULT_KEEP_UNRELIABLE == trust.DEFAULT_KEEP_UNRELIABLE
    ranges = load_tool("semantic_variance").parse_ranges(
        load_tool("semantic_variance").DEFAULT_RANGES)
    assert ranges == tuple(DEFAULT_SIZE_RANGES)
