import subprocess
import sys

import cpr_d2.layers as L


def test_collect_env_reports_detectron2_and_the_op():
    proc = subprocess.run([sys.executable, "-m", "cpr_d2.collect_env"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "detectron2 environment unavailable" not in out, out
    assert "PyTorch" in out and "detectron2" in out  # detectron2's own table
    status = L.extension_status()
    assert f"cpr_d2._C                   {status['path']}" in out
    expected_cuda = "yes, compiled against CUDA runtime" if status["with_cuda"] else "no (CPU-only"
    assert expected_cuda in out
