"""The search space of `littune sweep`: a mapping from finetune flags to what to try, checked against each flag's
declared type and range before anything is written, and turned into Optuna distributions.

The grammar (JSON or YAML; `--search '{...}'`, a .yaml/.json file, or a `search:` mapping in a --config file):
    [low, high]              a range: an int flag samples integers low..high, a float flag floats (uniform)
    [low, high, "log"]       a range sampled on a log scale (low > 0)
    {"low": L, "high": H, "log": true, "step": S}    the same, with an optional step ("log" and "step" exclude
                             each other in Optuna)
    [a, b, c, ...]           3 or more values, or any list holding a non-number: one of these choices
    {"choices": [a, b]}      choices, also for two numbers (which the list form reads as a range)
    a single value           fixed for every trial (as giving the flag)
"""

import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

from littune.common import Check, UserError, json_type

# flags a sweep decides itself or that are no property of a trial's run: never searched
NOT_SEARCHED = {"checkpoint_dir", "data_dir", "out_dir", "resume", "overwrite", "devices", "num_nodes", "strategy",
                "best_metric", "logger", "mlflow_tracking_uri"}


def read_search(search) -> dict:
    """--search as a mapping: given as one already (a --config file), as JSON/YAML text, or as a .yaml/.json file."""
    import yaml

    if isinstance(search, dict):
        space = search
    else:
        text = str(search)
        if text.strip().endswith((".yaml", ".yml", ".json")) and not text.lstrip().startswith(("{", "[")):
            path = Path(text.strip())
            if not path.is_file():
                raise UserError(f"--search {text}: no such file")
            text = path.read_text(encoding="utf-8")
        try:
            space = json.loads(text)
        except json.JSONDecodeError as json_error:
            try:
                space = yaml.safe_load(text)
            except yaml.YAMLError:
                raise UserError(f"--search: not JSON or YAML ({json_error})") from None
    if not isinstance(space, dict) or not space:
        raise UserError(f"--search: must be a mapping of finetune flags to ranges or choices, e.g. "
                        f"'{{\"learning_rate\": [1e-4, 1e-2, \"log\"]}}'; got {json_type(space)}")
    return space


def distributions(space: dict, hints: dict) -> dict:
    """flag -> an Optuna distribution, or ("fixed", value); hints: the finetune command's type hints (with extras).
    Every endpoint and choice is checked against the flag's type and declared range (`Check`)."""
    out = {}
    for flag, spec in space.items():
        if flag not in hints:
            raise UserError(f"--search: {flag!r} is not a flag of littune finetune (see littune finetune METHOD --help)")
        if flag in NOT_SEARCHED:
            raise UserError(f"--search: {flag} cannot be searched (the sweep sets it for every trial); give it as "
                            f"--{flag}")
        out[flag] = distribution(flag, spec, hints[flag])
    return out


def distribution(flag: str, spec: Any, hint) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(spec, dict) and set(spec) == {"choices"}:
        spec_kind, choices = "choices", spec["choices"]
    elif isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "step"}
        if unknown or not {"low", "high"} <= set(spec):
            raise UserError(f"--search {flag}: a range mapping has low, high and optionally log, step; got "
                            f"{', '.join(sorted(spec))}")
        spec_kind, choices = "range", None
    elif isinstance(spec, list) and (len(spec) == 2 or (len(spec) == 3 and spec[2] == "log")) \
            and all(_is_number(v) for v in spec[:2]):
        spec_kind, choices, spec = "range", None, {"low": spec[0], "high": spec[1], "log": len(spec) == 3}
    elif isinstance(spec, list):
        spec_kind, choices = "choices", spec
    else:
        spec_kind, choices = "fixed", [spec]
    if spec_kind in ("choices", "fixed"):
        if not isinstance(choices, list) or not choices:
            raise UserError(f"--search {flag}: choices must be a non-empty list")
        choices = [_conformed(flag, value, hint) for value in choices]
        if spec_kind == "fixed":
            return ("fixed", choices[0])
        if len({json.dumps(c) for c in choices}) < len(choices):
            raise UserError(f"--search {flag}: the choices repeat a value")
        return CategoricalDistribution([_storable(c) for c in choices])
    kind = _number_kind(hint)
    if kind is None:
        raise UserError(f"--search {flag}: not a numeric flag, so no range; give a list of choices")
    low, high = (_number(flag, spec[k], kind) for k in ("low", "high"))
    log, step = bool(spec.get("log", False)), spec.get("step")
    if not low < high:
        raise UserError(f"--search {flag}: low {low} must be below high {high}")
    if log and low <= 0:
        raise UserError(f"--search {flag}: a log range needs low > 0; got {low}")
    if log and step is not None:
        raise UserError(f"--search {flag}: give log or step, not both")
    for value in (low, high):
        _conformed(flag, value, hint)
    if kind is int:
        return IntDistribution(int(low), int(high), log=log, step=int(_number(flag, step, int)) if step else 1)
    return FloatDistribution(float(low), float(high), log=log, step=float(_number(flag, step, float)) if step else None)


def suggest(trial, flag: str, dist) -> Any:
    """Ask the trial for this flag's value (the fixed value for a fixed flag)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, tuple):
        return dist[1]
    if isinstance(dist, CategoricalDistribution):
        return _unstored(trial.suggest_categorical(flag, dist.choices))
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(flag, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(flag, dist.low, dist.high, step=dist.step, log=dist.log)


def describe(space: dict) -> dict:
    """The space as plain JSON (what a study records, so that a resumed study can be checked against it)."""
    from optuna.distributions import distribution_to_json

    return {flag: ["fixed", _storable(d[1])] if isinstance(d, tuple) else json.loads(distribution_to_json(d))
            for flag, d in sorted(space.items())}


# -------------------------------------------------------------------------------------------------- helpers


def _is_number(value) -> bool:
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            float(value)
            return True
        except ValueError:
            return False
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(flag: str, value, kind: type):
    if not _is_number(value):
        raise UserError(f"--search {flag}: {value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise UserError(f"--search {flag}: {value!r} is not finite")
    if kind is int:
        if not number.is_integer():
            raise UserError(f"--search {flag}: an integer flag; {value!r} is not an integer")
        return int(number)
    return number


def _number_kind(hint):
    """int or float for a flag whose type takes numbers (inside Optional/Annotated/Union), else None."""
    base = _strip(hint)
    if base in (int, float):
        return base
    for arg in typing.get_args(base) if typing.get_origin(base) is typing.Union else ():
        if _strip(arg) in (int, float):
            return _strip(arg)
    return None


def _strip(hint):
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _checks(hint) -> list:
    found = []
    if typing.get_origin(hint) is typing.Annotated:
        found += [m for m in hint.__metadata__ if isinstance(m, Check)]
    for arg in typing.get_args(hint):
        found += _checks(arg) if not isinstance(arg, Check) else []
    return found


def _conformed(flag: str, value, hint):
    """The value as the flag takes it (a numeric string read as a number), or a UserError saying why it cannot be."""
    base = _strip(hint)
    if value is None:
        if typing.get_origin(base) is typing.Union and type(None) in typing.get_args(base):
            return None
        raise UserError(f"--search {flag}: null is not a value of this flag")
    if typing.get_origin(base) is typing.Union:
        refusals = []
        for arg in (a for a in typing.get_args(base) if a is not type(None)):
            try:
                return _conformed(flag, value, arg)
            except UserError as refusal:
                refusals.append(refusal)
        if len(refusals) == 1:  # Optional[X]: X's own reason (a range) says more than "not a value"
            raise refusals[0]
        raise UserError(f"--search {flag}: {value!r} is not a value of this flag")
    if typing.get_origin(base) is Literal:
        if value not in typing.get_args(base):
            raise UserError(f"--search {flag}: {value!r} is not a choice; choose from "
                            f"{', '.join(map(str, typing.get_args(base)))}")
        return value
    if base is bool:
        if not isinstance(value, bool):
            raise UserError(f"--search {flag}: {value!r} is not true or false")
        return value
    if base in (int, float):
        number = _number(flag, value, base)
        for check in _checks(hint):
            if not check.allows(number):
                raise UserError(f"--search {flag}: {number} must be {check.describe()}")
        return number
    if base in (str, Path):
        if not isinstance(value, str):
            raise UserError(f"--search {flag}: {value!r} is not text")
        return value
    if typing.get_origin(base) is list and isinstance(value, list):
        return [_conformed(flag, v, typing.get_args(base)[0]) for v in value]
    raise UserError(f"--search {flag}: {value!r} is not a value of this flag")


def _storable(value):
    """Optuna's categorical choices are None, bool, int, float or str: a list choice is stored as its JSON."""
    return json.dumps(value) if isinstance(value, list) else value


def _unstored(value):
    return json.loads(value) if isinstance(value, str) and value.startswith("[") else value
