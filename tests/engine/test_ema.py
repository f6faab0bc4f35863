"""SOLVER.EMA: the average by hand, the swap at the end, and its state for resuming."""
import pytest
import torch

from cpr_d2.engine.ema import EMAHook


class _Trainer:
    def __init__(self, max_iter):
        self.iter, self.max_iter = 0, max_iter


def _run(hook, model, values, start=0):
    for it, v in enumerate(values, start):
        hook.trainer.iter = it
        with torch.no_grad():
            model.weight.fill_(v)
        hook.after_step()


def test_average_by_hand_and_the_swap_at_the_last_iteration():
    model = torch.nn.Linear(1, 1, bias=False)
    hook = EMAHook(model, decay=0.5)
    hook.trainer = _Trainer(max_iter=4)
    values = [1.0, 2.0, 3.0, 4.0]
    _run(hook, model, values[:3])
    # it 0: copy 1; it 1: d = min(0.5, 2/11) -> 1 * 2/11 + 2 * 9/11; it 2: d = min(0.5, 3/12)
    expected = 1.0
    for it, v in enumerate(values[:3]):
        if it:
            d = min(0.5, (1 + it) / (10 + it))
            expected = d * expected + (1 - d) * v
    assert float(hook.average["weight"]) == pytest.approx(expected)
    assert model.weight.item() == 3.0  # the raw weights until the end
    _run(hook, model, values[3:], start=3)
    d = min(0.5, 4 / 13)
    assert model.weight.item() == pytest.approx(d * expected + (1 - d) * 4.0)


def test_resumed_average_equals_the_uninterrupted_one():
    values = [0.3, -1.0, 2.5, 0.7, 1.1, -0.2]
    straight = torch.nn.Linear(1, 1, bias=False)
    a = EMAHook(straight, 0.9)
    a.trainer = _Trainer(len(values))
    _run(a, straight, values)

    first = torch.nn.Linear(1, 1, bias=False)
    b = EMAHook(first, 0.9)
    b.trainer = _Trainer(len(values))
    _run(b, first, values[:3])
    state = b.state_dict()
    resumed = torch.nn.Linear(1, 1, bias=False)
    c = EMAHook(resumed, 0.9)
    c.load_state_dict(state)
    c.trainer = _Trainer(len(values))
    _run(c, resumed, values[3:], start=3)
    assert torch.equal(resumed.weight, straight.weight)


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_bad_decay_names_the_key(decay):
    with pytest.raises(ValueError, match="SOLVER.EMA.DECAY"):
        EMAHook(torch.nn.Linear(1, 1), decay)
