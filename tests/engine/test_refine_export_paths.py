"""tools/refine_export.py checks --output before any work: a refinement whose json
cannot be written is lost."""
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from cpr_d2.engine.refine import check_refined_output
from tests.data.helpers import write_dataset
from tests.tool_loader import load_tool

CPR = "configs/forest/cpr_R18_s8_r2.yaml"


@pytest.fixture
def tool(monkeypatch):
    """tools/refine_export.py, where building the model (the first piece of work) fails."""
    refine_export = load_tool("refine_export")

    def no_work(*args, **kwargs):
        raise AssertionError("the refinement started before --output was checked")

    # The tool imports these when it runs (after parsing its arguments).
    import cpr_d2.engine.refine
    from cpr_d2.engine import Trainer

    monkeypatch.setattr(Trainer, "build_model", no_work)
    monkeypatch.setattr(cpr_d2.engine.refine, "refine_dataset", no_work)
    return refine_export


def run(tool, tmp_path, output, source=None):
    if source is None:
        json_file, root = write_dataset(tmp_path, images=False)
        source = ["--json", json_file, "--image-root", root]
    args = tool.parse_args(["--config-file", CPR, *source, "--output", str(output),
                            "OUTPUT_DIR", str(tmp_path / "run"), "MODEL.WEIGHTS", "unused.pth"])
    return tool.main(args)


def files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, names in os.walk(folder) for f in names)


def test_output_that_is_a_folder(tool, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=rf"--output {tmp_path}/out is a folder; pass the path "
                                         rf"of the json to write, e.g. --output "
                                         rf"{tmp_path}/out/refined"):
        run(tool, tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match=r"new/ is a folder"):
        run(tool, tmp_path, f"{tmp_path}/new/")
    assert not (tmp_path / "new").exists()


def test_output_under_a_file(tool, tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    output = tmp_path / "notes.txt" / "sub" / "refined.json"
    with pytest.raises(ValueError, match=rf"{tmp_path}/notes.txt is a file, so the folder "
                                         rf"{tmp_path}/notes.txt/sub cannot be created"):
        run(tool, tmp_path, output)


def test_output_that_is_not_a_regular_file(tool, tmp_path):
    os.mkfifo(tmp_path / "pipe.json")
    with pytest.raises(ValueError, match=r"pipe.json exists and is not a regular file"):
        run(tool, tmp_path, tmp_path / "pipe.json")
    os.symlink(tmp_path / "nowhere.json", tmp_path / "dangling.json")
    with pytest.raises(ValueError, match=r"dangling.json exists and is not a regular file"):
        run(tool, tmp_path, tmp_path / "dangling.json")


def test_output_folder_without_write_permission(tool, tmp_path, monkeypatch):
    # As root, permission bits do not stop writes: the folder refuses the probe file instead.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("cpr_d2.utils.io.tempfile.mkstemp", refuse)
    with pytest.raises(ValueError, match=rf"--output {tmp_path}/refined.json: cannot create files "
                                         r"in its folder \(PermissionError: Permission denied\); "
                                         r"pass a path in a folder you can write in"):
        run(tool, tmp_path, tmp_path / "refined.json")
    with pytest.raises(ValueError, match=rf"cannot create files in {tmp_path}, where its folder "
                                         rf"{tmp_path}/a/b would be created"):
        run(tool, tmp_path, tmp_path / "a" / "b" / "refined.json")


def test_output_that_is_the_input_json(tool, tmp_path):
    json_file, root = write_dataset(tmp_path, images=False)
    before = open(json_file).read()
    source = ["--json", json_file, "--image-root", root]
    with pytest.raises(ValueError, match=r"is the input json"):
        run(tool, tmp_path, json_file, source)
    os.symlink(json_file, tmp_path / "link.json")
    with pytest.raises(ValueError, match=rf"--output {tmp_path}/link.json is the input json"):
        run(tool, tmp_path, tmp_path / "link.json", source)
    os.link(json_file, tmp_path / "hard.json")
    with pytest.raises(ValueError, match=r"hard.json is the input json"):
        run(tool, tmp_path, tmp_path / "hard.json", source)
    assert open(json_file).read() == before


def test_output_that_is_the_json_of_a_registered_dataset(tool, tmp_path):
    json_file, root = write_dataset(tmp_path, images=False)
    name = "refine_export_paths_source"
    source = ["--dataset", name]
    args = tool.parse_args(["--config-file", CPR, *source, "--output", json_file,
                            "OUTPUT_DIR", str(tmp_path / "run"), "MODEL.WEIGHTS", "unused.pth",
                            "DATASETS.POINT_JSONS", repr(((name, json_file, root),))])
    try:
        with pytest.raises(ValueError, match=rf"--output {json_file} is the input json"):
            tool.main(args)
    finally:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_a_good_output_is_checked_without_creating_anything(tmp_path):
    before = files(tmp_path)
    check_refined_output(str(tmp_path / "new" / "deeper" / "refined.json"), None)
    (tmp_path / "old.json").write_text("{}")
    check_refined_output(str(tmp_path / "old.json"), str(tmp_path / "points.json"))  # replaced
    assert files(tmp_path) == sorted(before + ["old.json"])
    assert not (tmp_path / "new").exists()
