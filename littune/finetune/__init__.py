"""Fine-tuning: `littune finetune METHOD`, one command per method of `littune.methods`, all on one training loop.

- `args.py`: the flags, declared once; `loop.py`: the Fabric loop; `evaluation.py`: the validation loss, task
  metrics and sample answer of each evaluation; `schedule.py`: batch order, learning rate, optimizer; `state.py`:
  resumable state; `logs.py`: metrics.csv, progress bar, TensorBoard/MLflow; `prefix.py`: shared-prefix training;
  `guard.py`: the loss blow-up watch.
"""

import functools
import inspect
from dataclasses import fields

from littune.methods import METHODS, get_method


@functools.cache
def command(name: str):
    """The `littune finetune NAME` function: the shared flags (TrainArgs) plus the method's own, all flat, each
    checked against its declared range before anything is read. Built once per method: jsonargparse reads the
    function many times while it builds the parser, and the help text is parsed from the dataclasses' source."""
    from littune.common import checked
    from littune.finetune import loop
    from littune.finetune.args import TrainArgs, flag_help, flag_parameters

    method = get_method(name)
    train_names = {f.name for f in fields(TrainArgs)}

    def run(**flags):
        train = TrainArgs(**{k: v for k, v in flags.items() if k in train_names})
        return loop.finetune(method, train, method.args(**{k: v for k, v in flags.items() if k not in train_names}))

    parameters = flag_parameters(TrainArgs, method.args)
    run.__signature__ = inspect.Signature(parameters)
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    run.__doc__ = f"{method.summary}\n\n{flag_help(TrainArgs, method.args)}\n"
    run.__name__ = run.__qualname__ = name
    return checked(run)


def __getattr__(name: str):
    """`littune.finetune.adapter_v2` and friends: the command of each registered method."""
    if name in METHODS:
        return command(name)
    raise AttributeError(name)
