"""Same seed, same config, CPU: training twice gives identical losses (every iteration)
and an identical refined json. And the training data stream is a pure function of the
seed and the stream position."""
import json
import random

import numpy as np
import pytest
import torch
from detectron2.engine import default_argument_parser

from cpr_d2.data.samplers import (ResumableTrainingSampler, build_resumable_train_loader,
                                  sample_seed, seeded_rng)
from cpr_d2.engine import Trainer, setup_cfg
from tests.tool_loader import load_tool

CPR_CONFIG = "configs/forest/cpr_R18_s8_r2.yaml"
P2P_CONFIG = "configs/forest/p2p_R18_s8.yaml"
# Four steps, the LR step in between, one data-loader worker (as the forest configs),
# random crops and flips, no checkpoint but the final one, no evaluation.
TINY = ["SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(2,)",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "1", "SEED", "0",
        "DATASETS.TEST", "()"]


def _train(config, out, opts):
    """Train in this process as tools/train_net.py does; the losses of every iteration
    and the rows of metrics.json (without timings)."""
    args = default_argument_parser().parse_args(
        ["--config-file", config, *TINY, *opts, "OUTPUT_DIR", str(out)])
    trainer = Trainer(setup_cfg(args, training=True))
    trainer.resume_or_load(resume=False)
    trainer.train()
    losses = {name: [(it, value) for value, it in history.values()]
              for name, history in trainer.storage.histories().items() if "loss" in name}
    rows = [{k: v for k, v in json.loads(line).items() if "time" not in k}
            for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    weights = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    return losses, rows, weights


def _assert_same_training(a, b):
    losses_a, rows_a, weights_a = a
    losses_b, rows_b, weights_b = b
    assert "total_loss" in losses_a and len(losses_a["total_loss"]) == 4
    assert losses_a == losses_b  # every term, every iteration, exactly
    assert rows_a == rows_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def _subset_json(tmp_path, images):
    """The first `images` images of `forest` (and their annotations) as a json."""
    from cpr_d2.data import dataset_files

    source_json, image_root = dataset_files("forest")
    data = json.loads(open(source_json).read())
    data["images"] = data["images"][:images]
    keep = {image["id"] for image in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path = tmp_path / "subset.json"
    path.write_text(json.dumps(data))
    return path, image_root


def test_cpr_training_and_refined_json_are_reproducible(tmp_path):
    opts = ["MODEL.CPR.CONV_CHANNELS", "64", "MODEL.CPR.NUM_CONVS", "1"]
    runs = [_train(CPR_CONFIG, tmp_path / f"run{k}", opts) for k in range(2)]
    _assert_same_training(*runs)

    refine_export = load_tool("refine_export")
    subset, image_root = _subset_json(tmp_path, images=4)
    exported = []
    for k in range(2):
        output = tmp_path / f"refined{k}.json"
        refine_export.main(refine_export.parse_args(
            ["--config-file", CPR_CONFIG, "--json", str(subset), "--image-root", image_root,
             "--output", str(output), *opts,
             "MODEL.WEIGHTS", str(tmp_path / f"run{k}" / "model_final.pth"),
             "OUTPUT_DIR", str(tmp_path / f"export{k}"), "DATALOADER.NUM_WORKERS", "0"]))
        exported.append(output.read_bytes())
    assert exported[0] == exported[1]
    assert sum("refine_score" in a for a in json.loads(exported[0])["annotations"]) > 0


def test_p2p_training_is_reproducible(tmp_path):
    opts = ["MODEL.P2PNET.CONV_CHANNELS", "64", "MODEL.P2PNET.NUM_CONVS", "1"]
    _assert_same_training(*(_train(P2P_CONFIG, tmp_path / f"run{k}", opts) for k in range(2)))


# The data stream, on a toy dataset: orientation from width/height, a "mapper" that
# reports the index and what it drew from each global generator.
DATA = [{"i": i, "width": 30 if i % 3 == 0 else 10, "height": 20} for i in range(7)]


def _mapper(record):
    return record["i"], float(np.random.rand()), random.random(), float(torch.rand(()))


def _batches(n, start_iter=0, workers=0, total=2, rank=0, world_size=1, grouping=False, seed=3):
    sampler = ResumableTrainingSampler(len(DATA), seed, rank=rank, world_size=world_size)
    loader = build_resumable_train_loader(DATA, _mapper, sampler, total,
                                          aspect_ratio_grouping=grouping, num_workers=workers)
    iterator = iter(loader)  # as SimpleTrainer does, before the trainer knows the start
    sampler.set_start(start_iter * total)
    return [next(iterator) for _ in range(n)]


def test_sampler_stream_is_a_function_of_seed_and_position():
    sampler = ResumableTrainingSampler(7, 3, rank=0, world_size=1)
    stream = [sampler.index_at(p) for p in range(21)]
    for epoch in range(3):  # each epoch a permutation
        assert sorted(stream[7 * epoch:7 * epoch + 7]) == list(range(7))
    assert stream[:7] != stream[7:14]
    assert stream == [index for index, _ in _take(sampler.iter_from(0), 21)]
    assert stream != [ResumableTrainingSampler(7, 4, rank=0, world_size=1).index_at(p)
                      for p in range(21)]
    # Two processes take alternate positions of the same stream.
    ranks = [ResumableTrainingSampler(7, 3, rank=r, world_size=2) for r in range(2)]
    for r, rank_sampler in enumerate(ranks):
        rank_sampler.set_start(4)
        assert _take(rank_sampler, 5) == [(stream[p], p) for p in range(4 + r, 14 + r, 2)]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ranks[0].set_start(3)
    unshuffled = ResumableTrainingSampler(3, 0, shuffle=False, rank=0, world_size=1)
    assert [i for i, _ in _take(unshuffled, 7)] == [0, 1, 2, 0, 1, 2, 0]
    assert sample_seed(3, 10) == sample_seed(3, 10) != sample_seed(3, 11) != sample_seed(4, 10)


def _take(iterable, n):
    iterator = iter(iterable)
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("grouping", [False, True])
def test_batches_do_not_depend_on_workers_or_start(grouping):
    reference = _batches(8, grouping=grouping)
    assert _batches(8, workers=2, grouping=grouping) == reference
    assert _batches(5, start_iter=3, workers=1, grouping=grouping) == reference[3:]
    assert _batches(8, grouping=grouping, seed=4) != reference
    if grouping:  # each batch one orientation
        assert all(len({DATA[i]["width"] > 20 for i, *_ in batch}) == 1 for batch in reference)
    # Each sample's augmentation randomness comes from its own seed.
    draws = [sample[1:] for batch in reference for sample in batch]
    assert len(set(draws)) == len(draws)


def test_two_processes_share_one_stream():
    single = _batches(4, total=4)
    ranks = [_batches(4, total=4, rank=r, world_size=2) for r in range(2)]
    # Step k: the same four samples, process r taking stream positions r, r + 2.
    for k in range(4):
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(single[k])
        assert ranks[0][k] == single[k][0::2] and ranks[1][k] == single[k][1::2]


def test_seeded_rng_restores_the_global_generators():
    np.random.seed(1)
    random.seed(1)
    torch.manual_seed(1)
    expected = (np.random.rand(), random.random(), torch.rand(()))
    np.random.seed(1)
    random.seed(1)
    torch.manual_seed(1)
    with seeded_rng(5):
        inside = (np.random.rand(), random.random(), torch.rand(()))
    assert (np.random.rand(), random.random(), torch.rand(())) == expected
    with seeded_rng(5):
        assert (np.random.rand(), random.random(), torch.rand(())) == inside
