"""Loss blow-ups: a run whose training loss jumps far above its running mean and stays there.

A learning rate at the edge of stability can train well for dozens of steps and then diverge (the demo's adapter_v2
run at 3e-3: train loss ~0.3 to step 78, then 7.6, 7.3, 7.0, ... and a model that answers one label). The loop
watches every step's loss (`watch_loss`); once `SPIKE_STEPS` steps in a row are spikes it says so in one line, and
best/ gets the trainable weights of the last healthy step, scored like any evaluation, so that a run that never
recovers still leaves the model from before it.

A spike: a non-finite loss, or one above both FACTOR x the running mean and the mean + MARGIN (label tasks have
single steps at 3x their mean; a blow-up is 20x). The mean is an exponential moving average of healthy steps only.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

FACTOR = 4.0
MARGIN = 1.0
SPIKE_STEPS = 3
EMA = 0.1  # the weight of a new healthy step in the running mean (about the last 10-20 steps)


@dataclass
class LossWatch:
    mean: Optional[float] = None  # running mean of healthy steps' losses
    healthy_step: int = 0  # the last step whose loss was healthy
    healthy_weights: dict = field(default_factory=dict)  # the trainable weights after that step
    spikes: int = 0  # spikes in a row
    first_spike: Optional[tuple] = None  # (step, loss, mean before it) of the current run of spikes
    blow_ups: list = field(default_factory=list)  # (first spike step, its loss, the mean before it), as reported


def is_spike(loss: float, mean: Optional[float]) -> bool:
    if not math.isfinite(loss):
        return True
    return mean is not None and loss > max(FACTOR * mean, mean + MARGIN)


def watch_loss(watch: LossWatch, step: int, loss: float, trainable_weights: Callable[[], dict]) -> Optional[tuple]:
    """Record `step`'s loss; returns (first spike step, its loss, the mean) when this step confirms a blow-up (once
    per blow-up), else None. `trainable_weights()` copies the weights (called after healthy steps only)."""
    if not is_spike(loss, watch.mean):
        watch.mean = loss if watch.mean is None else (1 - EMA) * watch.mean + EMA * loss
        watch.healthy_step, watch.spikes = step, 0
        watch.healthy_weights = trainable_weights()
        return None
    watch.spikes += 1
    if watch.spikes == 1:
        watch.first_spike = (step, loss, watch.mean)
    if watch.spikes == SPIKE_STEPS:
        watch.blow_ups.append(watch.first_spike)
        return watch.first_spike
    return None


def blow_up_line(first_step: int, loss: float, mean: Optional[float], learning_rate: float, kept_step: int,
                 metric: str, kept_value: Optional[float]) -> str:
    mean_text = f"{mean:.3f}" if mean is not None else "none yet"
    scored = f" ({metric} {kept_value:.4f})" if kept_value is not None else ""
    return (f"warning: the training loss blew up at step {first_step} ({loss:.3f} against a running mean of "
            f"{mean_text}, {SPIKE_STEPS} steps in a row); best/ keeps step {kept_step}'s weights{scored} unless a "
            f"later evaluation beats them. Lower --learning_rate (this run: {learning_rate:g}) or raise --batch_size")
