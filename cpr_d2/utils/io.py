"""Writing files so that a crash or a kill never leaves a partial one."""
import json
import os
import tempfile

__all__ = ["write_json_atomic"]


def write_json_atomic(obj, path, indent=None):
    """Write `obj` as json to `path` through a temporary file in the same folder
    and os.replace: readers see the old file or the complete new one, never a
    partial one, and a failed write removes its temporary file."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            # One call into the C encoder: json.dump streams through Python, ~5x slower.
            f.write(json.dumps(obj, indent=indent))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
