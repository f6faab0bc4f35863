"""An exponential moving average of the model's weights (SOLVER.EMA).

After every step the hook updates ema = d * ema + (1 - d) * weights, with the decay
warmed up as d = min(DECAY, (1 + it) / (10 + it)) so early weights fade fast. At the
last iteration, before model_final is written, the averaged weights replace the
model's: the final checkpoint, its evaluation and everything that loads it use
them. Intermediate checkpoints hold the raw weights and the average (in the hook's
state), so a resumed run ends with the same average.
"""
import torch
from detectron2.engine import HookBase

__all__ = ["EMAHook"]


class EMAHook(HookBase):
    def __init__(self, model, decay):
        if not 0 < decay < 1:
            raise ValueError(f"SOLVER.EMA.DECAY must be in (0, 1), e.g. 0.999; got {decay}")
        self.decay = float(decay)
        self.model = model.module if hasattr(model, "module") else model
        self.average = None

    def _weights(self):
        return {k: v for k, v in self.model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def after_step(self):
        weights = self._weights()
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in weights.items()}
        else:
            it = self.trainer.iter
            d = min(self.decay, (1.0 + it) / (10.0 + it))
            for k, v in weights.items():
                self.average[k].mul_(d).add_(v.detach(), alpha=1 - d)
        if self.trainer.iter + 1 == self.trainer.max_iter:
            for k, v in weights.items():
                v.copy_(self.average[k])

    def state_dict(self):
        return {"average": self.average}

    def load_state_dict(self, state):
        average = state.get("average")
        self.average = None if average is None else {
            k: v.to(self.model.device if hasattr(self.model, "device") else v.device).clone()
            for k, v in average.items()}
