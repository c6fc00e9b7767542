"""The layout's promises: inference never imports training code; the base weights survive FSDP's materialisation
(the load order); each fine-tuning flag is declared once, and its help, checks and hyperparameters come from there."""

import ast
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, FSDPLikeFabric, finetune_argv, one_error_line, run_main
from littune.cli import main

PACKAGE = REPO / "littune"
# the inference side: modules and packages (every file in them) that must never import littune.finetune
INFERENCE = ["generate.py", "evaluate.py", "sampling.py", "scoring.py", "model.py", "metrics.py", "prompts.py",
             "prepared.py", "inputs.py", "plots.py", "scorings", "serve", "export"]
INFERENCE_MODULES = [p for name in INFERENCE for p in ([PACKAGE / name] if name.endswith(".py")
                                                        else sorted((PACKAGE / name).glob("*.py")))]
# the data flow, bottom up: a module imports only from a lower rank, or from its own package (export.hf from
# export). Two parts of one rank do not import each other: evaluate, generate, export and serve are all commands
# of the inference side, and a helper two of them need lives below them.
RANKS = {
    "littune": 0, "common": 0, "outbound": 0,
    "checkpoints": 1, "methods": 1, "metrics": 1, "precision": 1, "quantize": 1, "prepared": 1, "splits": 1,
    "prompts": 2, "model": 2, "label_sets": 2,
    "sampling": 3, "scoring": 3, "data": 3, "inputs": 3, "plots": 3, "decision": 3,
    "scorings": 4,
    "finetune": 5,
    "evaluate": 6, "generate": 6, "export": 6, "serve": 6,
    "sweep": 7, "demo": 7,
    "cli": 8,
}


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file names (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_inference_module_imports_training_code():
    gone = [name for name in INFERENCE if not (PACKAGE / name).exists()]
    assert gone == [], f"listed here but not in littune/: {gone}"
    checked = [path for path in INFERENCE_MODULES if path.is_file()]
    assert len(checked) >= 10
    for path in checked:
        training = sorted(m for m in imported_modules(path) if m.startswith("littune.finetune"))
        assert training == [], (path.name, training)


def package_imports() -> dict[str, set[str]]:
    """module -> the littune modules it imports (anywhere in the file), for every module of the package."""
    def name_of(path: Path) -> str:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        imported = {m for m in imported_modules(path) if m in modules and m != name}
        graph[name] = imported
    return graph


def test_no_import_cycle_inside_the_package():
    graph = package_imports()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycle = trail[trail.index(imported):] + [module, imported] if imported in trail else [module, imported]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, trail + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
    # every file of littune/ is a node of the graph, and every node was walked
    assert set(state) == set(graph) and len(graph) == len(list(PACKAGE.rglob("*.py")))


def part_of(module: str) -> str:
    """littune.export.hf -> export; littune -> littune."""
    return module.split(".")[1] if "." in module else module


def test_every_import_runs_down_the_data_flow():
    graph = package_imports()
    unranked = sorted({part_of(m) for m in graph} - set(RANKS))
    assert unranked == [], f"give these parts of littune a rank in RANKS: {unranked}"
    upward = [f"{module} -> {imported}" for module, imports in sorted(graph.items()) for imported in sorted(imports)
              if part_of(imported) != part_of(module) and RANKS[part_of(imported)] >= RANKS[part_of(module)]]
    assert upward == []


def test_no_private_name_is_imported_across_modules():
    """`from littune.x import _name` couples a module to another's internals: a shared name is made public."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("littune"):
                found += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_")]
    assert found == []


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_generate_and_evaluate_run_without_loading_the_training_package(small_checkpoint, alpaca64, tmp_path):
    """The real commands, in a fresh interpreter: afterwards no littune.finetune module is in sys.modules."""
    script = f"""
import sys
from littune.cli import main
assert main(["generate", "--prompt", "Name a color.", "--checkpoint_dir", {str(small_checkpoint)!r},
             "--max_new_tokens", "3", "--temperature", "0"]) == 0
assert main(["evaluate", "--checkpoint_dir", {str(small_checkpoint)!r}, "--data_dir", {str(alpaca64)!r},
             "--out_dir", {str(tmp_path / "eval")!r}, "--max_new_tokens", "2"]) == 0
loaded = sorted(m for m in sys.modules if m.startswith("littune.finetune"))
print("TRAINING MODULES:", loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TRAINING MODULES: []" in result.stdout, result.stdout[-2000:]
    assert (tmp_path / "eval" / "metrics.json").is_file()


@pytest.mark.parametrize("method_name", [None, "adapter_v2"])
def test_fsdp_load_order_every_parameter_equals_the_checkpoint(small_checkpoint, method_name):
    from littune.methods import get_method
    from littune.model import load_model

    method = get_method(method_name) if method_name else None
    model = load_model(FSDPLikeFabric(), small_checkpoint, method, trainable=method is not None, sharded=True)
    checkpoint = torch.load(small_checkpoint / "lit_model.pth", weights_only=True)
    state = model.state_dict()
    compared = 0
    for name, value in checkpoint.items():
        # litgpt's method models keep some base weights under another name (lm_head.weight -> lm_head.linear.weight)
        ours = state.get(name, state.get(name.replace(".weight", ".linear.weight").replace(".bias", ".linear.bias")))
        assert ours is not None and not ours.is_meta, name
        assert torch.equal(ours, value), name
        compared += 1
    assert compared == len(checkpoint) > 10
    if method is not None:  # the method's own parameters were initialised (materialised), not left empty
        trainable = {k: v for k, v in state.items() if method.is_trainable(k)}
        assert trainable and all(torch.isfinite(v).all() for v in trainable.values())


def test_each_finetune_flag_is_declared_once_and_drives_help_checks_and_hyperparameters(small_checkpoint, alpaca64,
                                                                                         tmp_path, capsys):
    from littune.common import Check
    from littune.finetune import command
    from littune.finetune.args import NOT_HYPERPARAMETERS, TrainArgs
    from littune.methods import METHODS, get_method

    for name in METHODS:
        run = command(name)
        declared = [f.name for f in fields(TrainArgs)] + [f.name for f in fields(get_method(name).args)]
        assert len(declared) == len(set(declared))
        assert sorted(run.checks) == sorted(n for n in declared if n in run.checks)
        for flag in declared:  # every flag has help text from its declaration
            assert f"    {flag}: " in run.__doc__ and len(run.__doc__.split(f"    {flag}: ")[1].split("\n")[0]) > 10
        # each declared range is enforced before any file is read (the checkpoint folder here does not exist)
        for flag, check in run.checks.items():
            bad = (check.ge - 1) if check.ge is not None else (check.gt if check.gt is not None else None)
            assert isinstance(check, Check) and bad is not None, flag
            argv = finetune_argv(tmp_path / "nowhere", tmp_path / "nothing", None, f"--{flag}", bad, method=name)
            one_error_line(run_main(capsys, *argv), f"--{flag} {bad}", check.describe(), code=1, alone=True)

    out = tmp_path / "run"
    assert main(finetune_argv(small_checkpoint, alpaca64, out, "--max_steps", "1", "--micro_batch_size", "2",
                              "--eval_interval", "1", "--eval_iters", "1")) == 0
    saved = yaml.safe_load((out / "hyperparameters.yaml").read_text())
    assert set(saved) == {"method"} | {f.name for f in fields(TrainArgs)} - NOT_HYPERPARAMETERS
    # defaults resolved for this data: 53 training records, micro-batch 2 -> the smallest batch, 2 (27 steps an
    # epoch); warmup 10% of the run's 1 step -> 1
    assert saved["batch_size"] == 2 and saved["warmup_steps"] == 1 and saved["precision"] == "32-true"


@pytest.mark.parametrize("records,batch,warmup,precision", [(100, 4, 3, "32-true"), (1900, 16, 12, "32-true"),
                                                            (100_000, 64, 100, "bf16-true")])
def test_defaults_fit_the_data_from_100_to_100000_records(records, batch, warmup, precision):
    """A user who passes no flags gets about 100 steps an epoch (at most 64 records a step) and a warmup that ends
    well inside the run; the precision is the machine's default (here given)."""
    from littune.finetune.args import TrainArgs, resolve_defaults, total_steps

    args = resolve_defaults(TrainArgs(checkpoint_dir=Path("c"), data_dir=Path("d")), "adapter_v2", records,
                            precision, label_task=False)
    steps = total_steps(records, args.batch_size, args.epochs, args.max_steps)
    assert (args.batch_size, args.warmup_steps, args.precision, args.epochs) == (batch, warmup, precision, 1)
    assert args.warmup_steps <= 0.1 * steps + 1 and steps >= 25
    assert args.out_dir == Path("out/adapter_v2/d") and args.best_metric == "val_loss"
