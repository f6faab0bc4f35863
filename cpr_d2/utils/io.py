"""Writing files so that a crash or a kill never leaves a partial one."""
import contextlib
import json
import os
import tempfile

__all__ = ["atomic_path", "check_output_file", "save_image_atomic", "write_json_atomic",
           "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path, mode=0o644):
    """Yields a temporary path in `path`'s folder; on success it is fsynced and renamed
    to `path` (readers see the old file or the complete new one, never a partial one);
    on failure it is removed."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    # Keep the extension last: image writers pick the format from it.
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(text, path):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json_atomic(obj, path, indent=None):
    """Write `obj` as json to `path` atomically (see atomic_path)."""
    # One call into the C encoder: json.dump streams through Python, ~5x slower.
    write_text_atomic(json.dumps(obj, indent=indent), path)


def save_image_atomic(image, path):
    """Save an (H, W, 3) uint8 RGB array (or a PIL image) to `path` atomically; the
    format follows the extension."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(
            os.path.splitext(path)[1].lower()))


def _nearest_existing(folder):
    while not os.path.lexists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def _same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b) or (
        os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def check_output_file(output, *, flag="--output", what="file", example="out.json", inputs=(),
                      inputs_are="an input", inputs_fix="choose another name"):
    """Raise a ValueError naming `flag` and the fix unless a file can be written at
    `output`: a path that is not a folder (nor anything but a regular file), none of the
    paths `inputs` (also through a link or a hard link; the error says `output` is
    `inputs_are`, then `inputs_fix`), in a folder that exists or can be created, where
    this user can create files (tried with an empty temporary file, removed at once).
    `what` names the file and `example` is the file name the folder error suggests.
    Nothing is created."""
    path = os.path.abspath(output)
    if output.endswith(os.sep) or os.path.isdir(path):
        raise ValueError(f"{flag} {output} is a folder; pass the path of the {what} to write, "
                         f"e.g. {flag} {os.path.join(output, example)}")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise ValueError(f"{flag} {output} exists and is not a regular file; pass the path "
                         f"of a new {what} or of a {what} to replace")
    for source in inputs:
        if _same_file(path, source):
            raise ValueError(f"{flag} {output} is {inputs_are}; {inputs_fix}")
    folder = os.path.dirname(path)
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {output}: {existing} is a file, so the folder {folder} "
                         "cannot be created; pass a path in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cpr_d2.", suffix=".probe", dir=existing)
    except OSError as e:
        where = ("its folder" if existing == folder else
                 f"{existing}, where its folder {folder} would be created")
        raise ValueError(f"{flag} {output}: cannot create files in {where} "
                         f"({type(e).__name__}: {e.strerror or e}); pass a path in a folder "
                         "you can write in, or fix the folder's permissions") from None
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(probe)

