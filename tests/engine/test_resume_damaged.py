"""--resume with a damaged last checkpoint (cut short, empty, not a torch file): the run
goes on from the newest earlier checkpoint that can be read, with a warning naming the
damaged one, which is left as it is; with none, a clear error says how to go on."""
import os
import shutil

import pytest
import torch

from cpr_d2.engine.checkpoint import (DamagedCheckpointError, resume_checkpoint_file,
                                      resume_or_load_checkpoint)
from cpr_d2.engine.checkpoint import AtomicCheckpointer
from tests.engine.test_resume import TINY, _assert_identical, _finish, _load, _start
from tests.tool_loader import load_tool

# 4 iterations, a checkpoint after iterations 1 and 3 (and model_final after 3).
FOUR = ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)"]


def _cut_short(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training run's folder: model_0000001.pth, model_0000003.pth, model_final.pth."""
    out = tmp_path_factory.mktemp("resume_damaged") / "run"
    _finish(_start(out, overrides=FOUR))
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    return out


def _copy(trained, to, names):
    to.mkdir()
    for name in names:
        shutil.copyfile(trained / name, to / name)
    return to


def test_resume_falls_back_to_the_previous_checkpoint(trained, tmp_path):
    # Killed after writing model_0000003.pth, which then lost its second half.
    out = _copy(trained, tmp_path / "run", ["model_0000001.pth", "model_0000003.pth"])
    (out / "last_checkpoint").write_text("model_0000003.pth")
    damaged = out / "model_0000003.pth"
    _cut_short(damaged)
    log = _finish(_start(out, resume=True, overrides=FOUR))
    assert (f"--resume: the last checkpoint {damaged} cannot be read (torch cannot read it, it "
            "is cut short or no torch file: ") in log
    assert f"resuming from {out}/model_0000001.pth, the newest earlier checkpoint" in log
    assert f"Loading from {out}/model_0000001.pth" in log
    assert "Starting training from iteration 2" in log
    # It trained iterations 2 and 3 again (and wrote model_0000003.pth anew): the weights
    # of the uninterrupted run.
    final, reference = _load(out / "model_final.pth"), _load(trained / "model_final.pth")
    assert final["iteration"] == reference["iteration"] == 3
    _assert_identical(final["model"], reference["model"], "model")
    _assert_identical(_load(damaged)["model"], _load(trained / "model_0000003.pth")["model"])


def test_resume_without_a_readable_checkpoint_is_a_clear_error(trained, tmp_path):
    out = _copy(trained, tmp_path / "run", ["model_0000001.pth", "model_final.pth"])
    (out / "last_checkpoint").write_text("model_final.pth")
    _cut_short(out / "model_final.pth", 0)
    (out / "model_0000001.pth").write_text("not a checkpoint")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    train_net = load_tool("train_net")
    args = train_net.argument_parser().parse_args(
        ["--config-file", "configs/forest/cpr_R18_s8_r2.yaml", "--resume", *TINY, *FOUR,
         "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)])
    with pytest.raises(DamagedCheckpointError) as err:
        train_net.main(args)
    message = str(err.value)
    assert message.startswith(f"cannot resume from {out}: its last checkpoint "
                              f"{out}/model_final.pth cannot be read (the file is empty (0 "
                              "bytes)), nor can any earlier one (model_0000001.pth: torch cannot "
                              "read it")
    assert "run without --resume" in message and "MODEL.WEIGHTS" in message
    assert f"delete {out}/model_final.pth and {out}/last_checkpoint first" in message
    # Nothing deleted, nothing changed (the failed run adds only its log and config).
    assert {name: (out / name).read_bytes() for name in before} == before


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)


def _saved(folder, names):
    """AtomicCheckpointer saves of a model whose weights are the checkpoint's position."""
    model = _Model()
    checkpointer = AtomicCheckpointer(model, str(folder), save_to_disk=True)
    for k, name in enumerate(names):
        with torch.no_grad():
            model.linear.weight.fill_(k)
        checkpointer.save(name)
    return checkpointer


@pytest.mark.parametrize("damage", ["cut short", "empty", "text", "not a checkpoint", "missing"])
def test_each_kind_of_damage_falls_back(tmp_path, damage, caplog):
    _saved(tmp_path, ["model_0000004", "model_0000009", "model_0000014"])
    last = tmp_path / "model_0000014.pth"
    if damage == "cut short":
        _cut_short(last)
    elif damage == "empty":
        _cut_short(last, 0)
    elif damage == "text":
        last.write_text("model weights")
    elif damage == "not a checkpoint":
        torch.save([1, 2, 3], last)
    else:
        last.unlink()
    fresh = _Model()
    checkpointer = AtomicCheckpointer(fresh, str(tmp_path), save_to_disk=True)
    with caplog.at_level("WARNING", logger="cpr_d2.engine.checkpoint"):
        assert resume_or_load_checkpoint(checkpointer, "", resume=True) == str(
            tmp_path / "model_0000009.pth")
    assert torch.equal(fresh.linear.weight, torch.full((2, 3), 1.0))
    assert f"the last checkpoint {last} cannot be read" in caplog.text
    assert os.path.lexists(last) == (damage != "missing")  # left as it is


def test_only_earlier_periodic_checkpoints_replace_the_tagged_one(tmp_path, caplog):
    checkpointer = _saved(tmp_path, ["model_0000002", "model_0000005", "model_0000007",
                                     "model_0000003"])  # tags model_0000003.pth
    _cut_short(tmp_path / "model_0000003.pth")
    (tmp_path / "model_0000002.pth").write_bytes(b"")
    # model_0000005/7 are newer than the tagged checkpoint (another run's): not used.
    with pytest.raises(DamagedCheckpointError, match=r"model_0000003.pth cannot be read .*nor "
                                                     r"can any earlier one \(model_0000002.pth: "
                                                     r"the file is empty"):
        resume_checkpoint_file(checkpointer)
    assert "the earlier checkpoint" in caplog.text


def test_model_final_falls_back_to_the_newest_periodic_checkpoint(tmp_path):
    checkpointer = _saved(tmp_path, ["model_0000001", "model_0000011", "model_0000002",
                                     "model_final"])
    (tmp_path / "model_final.pth").write_text("")
    assert resume_checkpoint_file(checkpointer) == str(tmp_path / "model_0000011.pth")


def test_an_empty_tag_falls_back_and_no_tag_means_nothing_to_resume(tmp_path):
    checkpointer = _saved(tmp_path, ["model_0000001", "model_0000003"])
    assert resume_checkpoint_file(checkpointer) == str(tmp_path / "model_0000003.pth")
    (tmp_path / "last_checkpoint").write_text("")
    assert resume_checkpoint_file(checkpointer) == str(tmp_path / "model_0000003.pth")
    (tmp_path / "last_checkpoint").unlink()
    assert resume_checkpoint_file(checkpointer) == ""
    # Without a last checkpoint (or without --resume) the weights file is loaded.
    weights = str(tmp_path / "model_0000001.pth")
    fresh = _Model()
    checkpointer = AtomicCheckpointer(fresh, str(tmp_path), save_to_disk=True)
    assert resume_or_load_checkpoint(checkpointer, weights, resume=True) is None
    assert torch.equal(fresh.linear.weight, torch.zeros(2, 3))
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    with torch.no_grad():
        fresh.linear.weight.fill_(9.0)
    assert resume_or_load_checkpoint(checkpointer, weights, resume=False) is None
    assert torch.equal(fresh.linear.weight, torch.zeros(2, 3))


def test_without_an_earlier_checkpoint_the_error_says_how_to_go_on(tmp_path):
    checkpointer = _saved(tmp_path, ["model_final"])
    _cut_short(tmp_path / "model_final.pth")
    with pytest.raises(DamagedCheckpointError) as err:
        resume_checkpoint_file(checkpointer)
    message = str(err.value)
    assert "and there is no earlier model_<iteration>.pth in the folder" in message
    assert "run without --resume" in message and "MODEL.WEIGHTS <file>" in message
    assert (tmp_path / "model_final.pth").exists()


def test_eval_only_resume_evaluates_the_last_readable_checkpoint(trained, tmp_path):
    out = _copy(trained, tmp_path / "run", ["model_0000001.pth", "model_0000003.pth"])
    (out / "last_checkpoint").write_text("model_0000003.pth")
    _cut_short(out / "model_0000003.pth")
    train_net = load_tool("train_net")
    args = train_net.argument_parser().parse_args(
        ["--config-file", "configs/forest/cpr_R18_s8_r2.yaml", "--eval-only", "--resume",
         *TINY, "OUTPUT_DIR", str(out)])
    train_net.main(args)
    log = (out / "log.txt").read_text()
    assert f"--resume: the last checkpoint {out}/model_0000003.pth cannot be read" in log
    assert f"Evaluating {out}/model_0000001.pth" in log
    # Without a checkpoint in OUTPUT_DIR, --resume evaluates MODEL.WEIGHTS, strictly.
    empty = tmp_path / "empty"
    args = train_net.argument_parser().parse_args(
        ["--config-file", "configs/forest/cpr_R18_s8_r2.yaml", "--eval-only", "--resume",
         *TINY, "MODEL.WEIGHTS", str(trained / "model_final.pth"), "OUTPUT_DIR", str(empty)])
    train_net.main(args)
    log = (empty / "log.txt").read_text()
    assert "has no last_checkpoint; evaluating MODEL.WEIGHTS" in log
    assert f"Evaluating {trained}/model_final.pth" in log
