"""Dynamic loss scaling for fp16 training over ztier's optimizer.

LossScaler follows torch.cuda.amp.GradScaler's rules (and its defaults):
the loss is multiplied by the scale before backward; the optimizer step
multiplies every gradient by 1/scale inside ztier's pipelined update (no
pass over the gradients, wherever they live); a step whose gradients hold
an inf or NaN on any rank is skipped and the scale is multiplied by
backoff_factor; after growth_interval steps in a row without one, the scale
is multiplied by growth_factor. Whether a gradient is finite is known from
ztier's hand-in summaries (ztier_grad_stats), not from another pass.

    scaler = ztier.torch.LossScaler()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)               # optional: before opt.clip_grad_norm_
    opt.clip_grad_norm_(1.0)           # optional
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
"""

from __future__ import annotations

import torch


class LossScaler:
    """See the module docstring; the arguments are GradScaler's."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True):
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self._scale = torch.tensor(float(init_scale), dtype=torch.float32)
        self._growth_factor = growth_factor
        self._backoff_factor = backoff_factor
        self._growth_interval = growth_interval
        self._growth_tracker = 0
        self._enabled = enabled
        self._found_inf = None   # this step's verdict, once unscaled
        self._unscaled = set()   # optimizers unscaled this step (by id)

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        return float(self._scale) if self._enabled else 1.0

    def scale(self, outputs):
        """outputs * scale (a tensor, or tensors in lists / tuples)."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            return outputs * self._scale.to(device=outputs.device, dtype=torch.float32)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError("LossScaler.scale: outputs must be a tensor or a list/tuple of tensors")

    def unscale_(self, optimizer) -> None:
        """Makes optimizer's next step divide the gradients by the scale and
        learns whether they are finite (every rank's). Once per step."""
        if not self._enabled:
            return
        if not hasattr(optimizer, "_unscale"):
            raise TypeError("ztier.torch.LossScaler works with ztier's optimizers (off.adamw / "
                            f"off.adam), whose step applies the scale; got {type(optimizer)}")
        if id(optimizer) in self._unscaled:
            raise RuntimeError("unscale_() has already been called on this optimizer since "
                               "the last update()")
        # torch's 1/scale: the reciprocal of the float32 scale, in float32.
        inv = float(self._scale.double().reciprocal().float())
        found = optimizer._unscale(inv)
        self._found_inf = bool(found) or bool(self._found_inf)
        self._unscaled.add(id(optimizer))

    def step(self, optimizer, *args, **kwargs):
        """optimizer.step() unless the gradients hold an inf or NaN (then
        the step is skipped: parameters and optimizer state stay)."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if id(optimizer) not in self._unscaled:
            self.unscale_(optimizer)
        if self._found_inf:
            optimizer._grad_scale = 1.0
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale=None) -> None:
        """Backs off after a skipped step, grows after growth_interval good ones."""
        if not self._enabled:
            return
        if new_scale is not None:
            self._scale = torch.tensor(float(new_scale), dtype=torch.float32)
        elif self._found_inf:
            self._scale = self._scale * self._backoff_factor
            self._growth_tracker = 0
        elif self._found_inf is not None:
            self._growth_tracker += 1
            if self._growth_tracker == self._growth_interval:
                self._scale = self._scale * self._growth_factor
                self._growth_tracker = 0
        self._found_inf = None
        self._unscaled = set()

    def state_dict(self) -> dict:
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor,
                "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self._scale = torch.tensor(float(state["scale"]), dtype=torch.float32)
        self._growth_factor = float(state["growth_factor"])
        self._backoff_factor = float(state["backoff_factor"])
        self._growth_interval = int(state["growth_interval"])
        self._growth_tracker = int(state["_growth_tracker"])
