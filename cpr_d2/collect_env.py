"""Environment report: detectron2's table plus the state of cpr_d2's compiled op.

    python -m cpr_d2.collect_env
"""
import os

import torch
from tabulate import tabulate

import cpr_d2
from cpr_d2.layers import extension_status


def cpr_d2_rows():
    status = extension_status()
    rows = [("cpr_d2", f"{cpr_d2.__version__} @{os.path.dirname(cpr_d2.__file__)}")]
    if not status["built"]:
        rows.append(("cpr_d2._C", f"not built ({status['error']}): point ops use the "
                                  "PyTorch reference"))
        return rows
    rows.append(("cpr_d2._C", status["path"]))
    cuda = "yes" if status["with_cuda"] else "no (CPU-only build)"
    if status["with_cuda"]:
        version = status["cuda_version"]
        cuda += f", compiled against CUDA runtime {version // 1000}.{version % 1000 // 10}"
    rows.append(("cpr_d2._C CUDA kernels", cuda))
    for device, ops in status["kernels"].items():
        rows.append((f"cpr_d2 {device.upper()} kernels", ", ".join(ops) if ops else "none"))
    rows.append(("cpr_d2 ops run on GPU here",
                 "yes" if status["with_cuda"] and torch.cuda.is_available() else
                 "no (no GPU visible)" if status["with_cuda"] else "no"))
    return rows


def collect_env_info():
    try:
        from detectron2.utils.collect_env import collect_env_info as detectron2_env_info

        detectron2_table = detectron2_env_info()
    except Exception as e:  # a broken detectron2 must not hide the rest of the report
        detectron2_table = f"detectron2 environment unavailable: {type(e).__name__}: {e}"
    return detectron2_table + "\n" + tabulate(cpr_d2_rows())


def main():
    print(collect_env_info())


if __name__ == "__main__":
    main()
