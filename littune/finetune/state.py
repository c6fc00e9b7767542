"""Resumable training state: the run's progress counters, its fingerprint, and the step-NNNNNN folders that hold
everything an exact resume needs (the trained weights, optimizer moments, counters, the place in the data, every
RNG state). Also the signal handling that turns Ctrl-C / SIGTERM into "finish the step, save, stop"."""

import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Optional

import torch

from littune.common import (Check, UserError, atomic_folder, check_fields, first_line, json_type, load_torch,
                            remove_atomic_leftovers, sha256_file, write_torch)
from littune.model import load_state, unwrap

STATE_FILE = "training_state.pt"


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint and restored on resume."""

    # the types and bounds a saved state's counters are checked against before a resumed run uses them
    step: Annotated[int, Check(ge=0)] = 0  # optimizer steps done
    epoch: Annotated[int, Check(ge=0)] = 0
    step_in_epoch: Annotated[int, Check(ge=0)] = 0  # steps done in that epoch
    tokens_seen: Annotated[int, Check(ge=0)] = 0
    elapsed: Annotated[float, Check(ge=0)] = 0.0  # seconds of training, over all sessions of the run
    best_value: Optional[Annotated[float, Check()]] = None  # of the run's best_metric
    best_step: Annotated[int, Check(ge=0)] = 0
    evals_since_best: Annotated[int, Check(ge=0)] = 0
    mlflow_run_id: Optional[str] = None  # a resumed run goes on logging into the same MLflow run
    wandb_run_id: Optional[str] = None  # and the same W&B run


# Flags that decide the weights but came after runs were saved: such a run trained as the flag's value here says.
FLAGS_ADDED_LATER = {"shared_prefix": False}
# The keys `fingerprint` writes besides the flags (a key added there belongs here too, or a refusal names it a flag)
NOT_FLAGS = {"model_config_sha256", "base_weights_bytes", "data_sha256", "total_steps"}


def step_folder(step: int) -> str:
    return f"step-{step:06d}"


def fingerprint(same_run: dict, checkpoint_dir: Path, data_dir: Path, train_file: Path, total_steps: int) -> dict:
    """What must be the same for a resumed run to be the same run."""
    return {
        "model_config_sha256": sha256_file(Path(checkpoint_dir) / "model_config.yaml"),
        "base_weights_bytes": (Path(checkpoint_dir) / "lit_model.pth").stat().st_size,
        "data_sha256": sha256_file(train_file),
        "total_steps": total_steps,
        **same_run,
    }


def trained_state(fabric, model, method) -> dict:
    """The trainable parameters, on CPU (gathered from every rank under FSDP)."""
    state = fabric.strategy.get_module_state_dict(model) if hasattr(fabric.strategy, "get_module_state_dict") \
        else model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if method.is_trainable(k)}


def optimizer_state(model, optimizer, sharded: bool) -> dict:
    """The optimizer's state as one full state dict (under FSDP gathered from the shards; rank 0 gets it)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), getattr(optimizer, "optimizer", optimizer),  # not Fabric's wrapper
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_training_state(fabric, model, optimizer, method, out_dir: Path, progress: Progress, fingerprint: dict,
                        run_files: dict, sharded: bool) -> None:
    """out_dir/step-NNNNNN/, built in a temporary folder and renamed into place, so a kill at any moment leaves
    either the complete folder or none. run_files: file name -> text written beside the weights."""
    adapter = trained_state(fabric, model, method)
    optimizer_dict = optimizer_state(model, optimizer, sharded)
    if fabric.global_rank == 0:
        import random

        import numpy as np

        with atomic_folder(out_dir / step_folder(progress.step)) as tmp:  # an earlier attempt's same step: replaced
            write_torch(adapter, tmp / method.adapter_file)
            numpy_state = np.random.get_state()
            write_torch({
                "counters": asdict(progress),
                "fingerprint": fingerprint,
                "optimizer": optimizer_dict,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "python": _to_lists(random.getstate()),
                    "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                },
            }, tmp / STATE_FILE)
            for name, text in run_files.items():
                (tmp / name).write_text(text, encoding="utf-8")
    fabric.barrier()


def remove_stale_temporaries(out_dir: Path) -> None:
    """Half-written files and folders of a run that was killed while saving (their names start with '.' and end
    with '.tmp': no reader ever mistakes them for a checkpoint); a step folder or best/ set aside for its
    replacement, which the kill stopped, is put back. best/ itself may hold a file of an older littune, which
    wrote its files one by one."""
    for folder in (out_dir, out_dir / "best"):
        if folder.is_dir():
            remove_atomic_leftovers(folder)


def find_resume_state(out_dir: Path, resume: str) -> Optional[Path]:
    """`auto`: the newest complete step folder in out_dir (none: start fresh); else the given folder."""
    if resume != "auto":
        folder = Path(resume)
        if not (folder / STATE_FILE).is_file():
            raise UserError(f"--resume {resume}: no {STATE_FILE} there (give a step-NNNNNN folder or 'auto')")
        return folder
    complete = sorted(p for p in Path(out_dir).glob("step-[0-9]*") if (p / STATE_FILE).is_file() and p.is_dir())
    if not complete:
        print(f"--resume auto: no saved state in {out_dir}; starting from step 0", file=sys.stderr)
        return None
    return complete[-1]


def saved_precision(folder: Path) -> Optional[str]:
    """The precision a saved run trained in (its hyperparameters.yaml, saved in every step folder), None where that
    file is missing or unreadable (resuming then decides afresh, and the fingerprint check says if it differs)."""
    import yaml

    try:
        hparams = yaml.safe_load((Path(folder) / "hyperparameters.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    precision = hparams.get("precision") if isinstance(hparams, dict) else None
    return precision if isinstance(precision, str) else None


def load_training_state(folder: Path, model, optimizer, method, fingerprint: dict, sharded: bool) -> Progress:
    """Restore a saved state; refuse (before touching anything) one from another model, data or settings."""
    import random

    import numpy as np

    path = folder / STATE_FILE
    saved = load_torch(path, "training state")
    if not isinstance(saved, dict) or not {"counters", "fingerprint", "optimizer", "rng"} <= saved.keys():
        raise UserError(f"{path}: not a littune training state; resume from another step folder")
    for key in ("counters", "fingerprint", "optimizer", "rng"):
        if not isinstance(saved[key], dict):
            raise UserError(f"{path}: {key} is {json_type(saved[key])}, not an object; resume from another step "
                            f"folder")
    adapter = load_torch(folder / method.adapter_file, "adapter weights")
    saved_run = {**FLAGS_ADDED_LATER, **saved["fingerprint"]}
    differing = sorted(k for k in set(fingerprint) | set(saved_run) if saved_run.get(k) != fingerprint.get(k))
    if differing:
        details = ", ".join(f"{k}: saved {saved_run.get(k)!r} vs now {fingerprint.get(k)!r}" for k in differing[:3])
        flags = " ".join(f"--{k} {str(saved_run[k]).lower() if isinstance(saved_run[k], bool) else saved_run[k]}"
                         for k in differing if k not in NOT_FLAGS and saved_run.get(k) is not None)
        hint = f"; resume with the saved values ({flags})" if flags else ""
        raise UserError(f"{folder}: cannot resume, the run differs ({details}){hint}")
    progress = checked_progress(saved["counters"], path, fingerprint.get("total_steps"))
    check_optimizer_state(saved["optimizer"], optimizer, path, sharded)
    check_rng_state(saved["rng"], path)
    missing = set(k for k, p in unwrap(model).named_parameters() if p.requires_grad) - set(adapter)
    if missing:
        raise UserError(f"{folder / method.adapter_file}: incomplete adapter (missing {sorted(missing)[:3]})")
    load_state(model, adapter, sharded)
    method.before_forward(unwrap(model))
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), getattr(optimizer, "optimizer", optimizer), saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        try:  # the layout is checked above; a moment of another shape or type is refused here
            optimizer.load_state_dict(saved["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{path}: optimizer cannot be restored ({type(e).__name__}: {first_line(e)}); resume "
                            f"from another step folder") from e
    rng = saved["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_to_tuples(rng["python"]))
    np.random.set_state(_numpy_state(rng["numpy"]))
    return progress


def checked_progress(counters: dict, path: Path, total_steps: Optional[int]) -> Progress:
    """The saved counters as a Progress, each of the type and in the range a run can reach (a step past the run's
    end would report it done and overwrite its final adapter; a negative one would name folders step--00001)."""
    progress = Progress(**check_fields(Progress, counters, str(path), prefix="counters."))
    limits = {"step": total_steps, **{name: progress.step for name in
                                      ("epoch", "step_in_epoch", "best_step", "evals_since_best")}}
    for name, limit in limits.items():
        if limit is not None and getattr(progress, name) > limit:
            bound = f"the run's {limit} steps" if name == "step" else f"counters.step ({limit})"
            raise UserError(f"{path}: counters.{name} is {getattr(progress, name)}, past {bound}; resume from "
                            f"another step folder")
    return progress


def check_optimizer_state(state: dict, optimizer, path: Path, sharded: bool) -> None:
    """The saved optimizer state has the optimizer's shape: its parameter groups, each of as many parameters (under
    FSDP, where the saved state is the full one and the optimizer holds shards, only the layout is checked)."""
    groups, mine = state.get("param_groups"), optimizer.state_dict()["param_groups"]
    if not isinstance(state.get("state"), dict) or not isinstance(groups, list) or any(
            not isinstance(g, dict) or not isinstance(g.get("params"), list) for g in groups) or not sharded and (
            len(groups) != len(mine) or any(len(g["params"]) != len(m["params"]) for g, m in zip(groups, mine))):
        raise UserError(f"{path}: optimizer is not the state of this run's optimizer ({len(mine)} parameter groups "
                        f"of {', '.join(str(len(m['params'])) for m in mine)} parameters); resume from another step "
                        f"folder")


def check_rng_state(rng: dict, path: Path) -> None:
    """Each saved random-number state is one its generator takes: tried on scratch generators, so that a bad one
    is refused before any global state is set."""
    import random

    import numpy as np

    def cuda(states):  # one ByteTensor per GPU of the saving machine (none saved on a CPU)
        if not isinstance(states, list) or not all(isinstance(t, torch.Tensor) for t in states):
            raise TypeError("not a list of tensors")

    tries = {"torch": lambda state: torch.Generator().set_state(state), "cuda": cuda,
             "python": lambda state: random.Random().setstate(_to_tuples(state)),
             "numpy": lambda state: np.random.RandomState().set_state(_numpy_state(state))}
    for name, attempt in tries.items():
        try:
            attempt(rng[name])
        except Exception as e:  # any type or value the generator refuses
            raise UserError(f"{path}: rng.{name} is not a random-number state ({type(e).__name__}); resume from "
                            f"another step folder") from e


def _numpy_state(saved: list) -> tuple:
    """numpy's state as saved (its key array as a list, for weights_only loading) -> the tuple numpy takes."""
    import numpy as np

    return (saved[0], np.array(saved[1], dtype=np.uint32), *saved[2:])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its optimizer step, save and stop (a second signal stops at once)."""

    def __init__(self):
        self.requested = None
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): no handler
                pass

    def handle(self, signum, frame):
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step, then saving (send again to stop at once)", file=sys.stderr)

    def agree(self, fabric) -> None:
        """Under DDP a signal may reach only some ranks: all of them save and stop together."""
        if fabric.world_size > 1 and fabric.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            self.requested = self.requested or "SIGNAL"

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
