"""Every bad input gets one clear line: the table of bad values and bad files of every command, run in-process as
the CLI runs them. Each case asserts a non-zero exit, a single line on stderr without a traceback, and no new or
changed file in the folders the command would write to."""

import collections
import inspect
import json
import shutil
from pathlib import Path

import pytest

from conftest import finetune_argv, one_error_line, run_main
from littune.cli import COMMANDS, _resolve, main


def commands() -> list[tuple[list[str], object]]:
    """(subcommand path, function) of every command of the CLI."""
    found = []
    for name, spec in _resolve(COMMANDS).items():
        if isinstance(spec, dict):
            found += [([name, sub], fn) for sub, fn in spec.items() if sub != "_help"]
        else:
            found.append(([name], spec))
    return found


def required_flags(function, tmp_path: Path) -> list[str]:
    """Values for the flags without a default: folders that do not exist, a choice's first value, plain words for
    text."""
    from littune.cli import _literal_choices

    args = []
    for name, param in inspect.signature(function).parameters.items():
        if param.default is inspect.Parameter.empty:
            choices = _literal_choices(function, name)
            value = choices[0] if choices else str(tmp_path / f"no-{name}") if "Path" in str(param.annotation) \
                else "hello"
            args += [f"--{name}", value]
    return args


COVERED = collections.Counter()  # command -> bad inputs run through run_bad in this module


@pytest.fixture(autouse=True, scope="module")
def report_covered():
    """Prints the table's bad inputs per command at the end of the module (`pytest -s` shows it)."""
    yield
    print("\nbad inputs per command: " + ", ".join(f"{c} {n}" for c, n in sorted(COVERED.items())))


def snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def run_bad(capsys, folder: Path, argv: list[str], *fragments: str, code: int = 1) -> str:
    """`littune ARGV` fails with one line naming the fragments, and writes nothing under `folder`."""
    before = snapshot(folder)
    words = [str(a) for a in argv if not str(a).startswith("-")][:2]
    COVERED[" ".join(words[:2]) if words[:1] == ["finetune"] else (words or ["(none)"])[0]] += 1
    line = one_error_line(run_main(capsys, *argv), *fragments, code=code, alone=True)
    assert snapshot(folder) == before, "the failed command changed files"
    return line


# ------------------------------------------------------------------------------------------ declared flag checks


def test_every_declared_flag_check_is_enforced_with_one_line(tmp_path, capsys, monkeypatch):
    """For each command, each flag declared with a Check gets a value outside its range: refused before anything
    is read or written, naming the flag, the value and the allowed range."""
    monkeypatch.chdir(tmp_path)
    walked = {}
    for path, function in commands():
        checks = getattr(function, "checks", {})
        walked[" ".join(path)] = len(checks)
        for flag, check in checks.items():
            bad = check.ge - 1 if check.ge is not None else check.gt if check.gt is not None else \
                check.le + 1 if check.le is not None else check.lt
            err = run_bad(capsys, tmp_path, [*path, *required_flags(function, tmp_path), f"--{flag}", bad],
                          f"--{flag} {bad}", check.describe())
            assert "must be" in err
            if check.le is not None and check.ge is not None:  # both ends of a closed range
                run_bad(capsys, tmp_path, [*path, *required_flags(function, tmp_path), f"--{flag}", check.le + 1],
                        f"--{flag}")
        if any("float" in str(t) for t in getattr(function, "__annotations__", {}).values()):
            for flag, check in checks.items():  # non-finite numbers are never valid
                if "float" in str(function.__annotations__.get(flag)):
                    run_bad(capsys, tmp_path, [*path, *required_flags(function, tmp_path), f"--{flag}", ".inf"],
                            f"--{flag} inf")
                    run_bad(capsys, tmp_path, [*path, *required_flags(function, tmp_path), f"--{flag}", "nan"],
                            f"--{flag}", code=2)  # not even a number to the parser
    # the commands with numeric flags declare their ranges
    for command in ("prepare", "finetune adapter_v2", "generate", "demo"):
        assert walked[command] >= 3, walked


def test_every_choice_flag_names_its_choices(tmp_path, capsys, monkeypatch):
    """Each flag declared as a Literal (precision, scoring, format, schedule, ...) given a value not among its
    choices: one line naming the flag, the value typed and every choice (jsonargparse's own message for a Literal
    can be 'Cannot take a Union of no types')."""
    from littune.cli import _literal_choices

    monkeypatch.chdir(tmp_path)
    walked = 0
    for path, function in commands():
        for flag in inspect.signature(function).parameters:
            choices = _literal_choices(function, flag)
            if choices:
                err = run_bad(capsys, tmp_path, [*path, *required_flags(function, tmp_path), f"--{flag}", "bogus"],
                              f"--{flag} 'bogus' is not a choice", ", ".join(choices), code=2)
                assert "Union" not in err
                walked += 1
    assert walked >= 10, walked


# ------------------------------------------------------------------------------------------------- parse errors


PARSE_ERRORS = [
    (["finetune", "adapter_v2", "--data_dir", "d"], "--checkpoint_dir is required", "converted base model"),
    (["finetune", "adapter_v2", "--checkpoint_dir", "c", "--data_dir", "d", "--micro_batchsize", "2"],
     "unknown flag --micro_batchsize", "did you mean --micro_batch_size"),
    (["finetune", "--checkpoint_dir", "c"], "name a subcommand first", "adapter_v2"),
    (["evaluat"], "did you mean evaluate"),
    (["generate", "--prompt", "x", "--checkpoint_dir", "c", "--temprature", "0"], "did you mean --temperature"),
    (["prepare", "--data_file", "x", "--checkpoint_dir", "c", "--seed", "abc"], "--seed", "abc"),
    (["finetune", "adapter_v2", "--checkpoint_dir", "c", "--data_dir", "d", "--strategy", "fsdpp"], "--strategy"),
    (["generate", "--prompt", "x", "--checkpoint_dir", "c", "--config", "missing.yaml"], "missing.yaml"),
]


@pytest.mark.parametrize("argv,fragments", [(a, f) for a, *f in PARSE_ERRORS])
def test_parse_errors_are_one_line_without_usage(argv, fragments, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_bad(capsys, tmp_path, argv, *fragments, code=2)


def test_dashed_flags_version_and_one_line_descriptions(tmp_path, capsys, monkeypatch):
    import littune

    monkeypatch.chdir(tmp_path)
    # --data-dir is --data_dir: the error is about the missing checkpoint, not an unknown flag
    run_bad(capsys, tmp_path, ["finetune", "adapter_v2", "--checkpoint-dir", tmp_path / "none", "--data-dir",
                               tmp_path / "none"], "no such checkpoint folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"littune {littune.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out.split("Available subcommands:")[1]
    for name in COMMANDS:  # every subcommand is listed with a one-line description
        line = next(l for l in listing.splitlines() if l.strip().startswith(name + " ") or l.strip() == name)
        assert len(line.split(name, 1)[1].strip()) > 10 or name in listing, line


# --------------------------------------------------------------------------------------------------- bad files


@pytest.fixture
def workspace(small_checkpoint, alpaca64, tmp_path):
    """A private copy of a converted checkpoint and of prepared data, to damage."""
    checkpoint = shutil.copytree(small_checkpoint, tmp_path / "ckpt")
    data = shutil.copytree(alpaca64, tmp_path / "data")
    return checkpoint, data


def test_bad_files_of_every_kind_give_one_line(workspace, tmp_path, capsys, monkeypatch):
    checkpoint, data = workspace
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    train = finetune_argv(checkpoint, data, out, "--max_steps", "1", "--micro_batch_size", "2", "--eval_interval", "1",
                          "--eval_iters", "1")
    generate = ["generate", "--prompt", "Name a color.", "--checkpoint_dir", checkpoint, "--max_new_tokens", "2"]
    evaluate = ["evaluate", "--checkpoint_dir", checkpoint, "--data_dir", data, "--out_dir", out / "eval"]
    cases = 0

    def damaged(path: Path, content: bytes, argv: list, *fragments: str):
        nonlocal cases
        original = path.read_bytes() if path.is_file() else None
        path.write_bytes(content)
        try:
            run_bad(capsys, tmp_path, argv, *fragments)
        finally:
            path.write_bytes(original) if original is not None else path.unlink()
        cases += 1

    # the base checkpoint: truncated weights, a YAML that is not a config, a corrupt tokenizer
    weights = (checkpoint / "lit_model.pth").read_bytes()
    damaged(checkpoint / "lit_model.pth", weights[: len(weights) // 2], generate, "lit_model.pth", "base weights")
    damaged(checkpoint / "lit_model.pth", b"", train, "lit_model.pth")
    damaged(checkpoint / "model_config.yaml", b"{not: [yaml", generate, "model_config.yaml", "littune convert")
    damaged(checkpoint / "model_config.yaml", b"n_layerz: 3\n", train, "model_config.yaml")
    damaged(checkpoint / "tokenizer.json", b"{\"model\": 1", generate, "tokenizer")
    damaged(checkpoint / "tokenizer.json", b"{\"model\": 1", ["prepare", "--data_file", tmp_path / "d.json",
                                                             "--checkpoint_dir", checkpoint, "--destination_path",
                                                             out / "p"], "d.json")
    # prepared data: a train.pt that is not records, a truncated test.pt, a prepare.json that is not JSON
    damaged(data / "train.pt", b"garbage", train, "train.pt")
    test_pt = (data / "test.pt").read_bytes()
    damaged(data / "test.pt", test_pt[:100], evaluate, "test.pt")
    damaged(data / "prepare.json", b"{", evaluate, "prepare.json")
    damaged(data / "prompt_style.yaml", b"class_path: os.system\n", evaluate, "prompt_style.yaml")
    # a run: adapter weights from another model, a corrupt adapter file, a broken hyperparameters.yaml
    assert main([str(a) for a in train]) == 0
    run = ["generate", "--prompt", "x", "--checkpoint_dir", checkpoint, "--adapter_path", out, "--max_new_tokens",
           "1"]
    adapter = out / "lit_model_adapter_finetuned.pth"
    damaged(adapter, b"PK\x03\x04 truncated zip", run, "adapter")
    import torch

    foreign = tmp_path / "foreign.pth"
    torch.save({"transformer.h.0.attn.adapter_wte.weight": torch.zeros(3, 3)}, foreign)
    damaged(adapter, foreign.read_bytes(), run, "not an adapter for")
    damaged(out / "hyperparameters.yaml", b"method: [", run, "hyperparameters.yaml")
    damaged(out / "hyperparameters.yaml", b"method: qlora\n", run, "unknown fine-tuning method")
    # a resume from a damaged state
    state = out / "step-000001" / "training_state.pt"
    damaged(state, b"", [*train, "--resume", "auto"], "training_state.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    damaged(state, (tmp_path / "list.pt").read_bytes(), [*train, "--resume", "auto"], "not a littune training state")
    # a --config file that is not YAML
    (tmp_path / "bad.yaml").write_text("learning_rate: [")
    run_bad(capsys, tmp_path, [*train, "--config", tmp_path / "bad.yaml"], "bad.yaml", code=2)
    assert cases >= 16


def test_bad_inputs_of_download_convert_merge_export_serve_and_evaluate(workspace, tmp_path, capsys, monkeypatch):
    checkpoint, data = workspace
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    run_bad(capsys, tmp_path, ["download", "--repo_id", "not-a-repo-id"], "expected ORG/NAME")
    run_bad(capsys, tmp_path, ["convert", "--checkpoint_dir", empty], "no weight files")
    folder = tmp_path / "hf-folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x08\x00")
    (folder / "config.json").write_text("{")
    run_bad(capsys, tmp_path, ["convert", "--checkpoint_dir", folder], "config.json", "invalid JSON")
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                                    "num_attention_heads": 4, "num_hidden_layers": 2,
                                                    "vocab_size": 100, "intermediate_size": 128,
                                                    "hidden_act": "silu"}))
    run_bad(capsys, tmp_path, ["convert", "--checkpoint_dir", folder], "model.safetensors", "truncated")
    # an adapter_v2 run cannot be merged or exported (its prefix does not fold into the weights)
    assert main(finetune_argv(checkpoint, data, out, "--max_steps", "1", "--micro_batch_size", "2", "--eval_interval",
                              "1", "--eval_iters", "1")) == 0
    run_bad(capsys, tmp_path, ["merge", "--checkpoint_dir", checkpoint, "--adapter_path", out, "--out_dir",
                               tmp_path / "merged"], "finetune lora")
    run_bad(capsys, tmp_path, ["export", "--checkpoint_dir", checkpoint, "--adapter_path", out, "--format", "hf",
                               "--out_dir", tmp_path / "hf"], "finetune lora")
    run_bad(capsys, tmp_path, ["export", "--checkpoint_dir", empty, "--format", "hf", "--out_dir",
                               tmp_path / "hf"], str(empty))
    run_bad(capsys, tmp_path, ["export", "--checkpoint_dir", checkpoint, "--format", "gguf", "--out_dir",
                               tmp_path / "gguf"], "gguf")
    run_bad(capsys, tmp_path, ["export", "--checkpoint_dir", checkpoint, "--format", "peft", "--out_dir",
                               tmp_path / "peft"], "peft")
    run_bad(capsys, tmp_path, ["export", "--checkpoint_dir", checkpoint, "--format", "hf", "--out_dir", data],
            "--overwrite")  # a non-empty folder
    # serve: a folder that is not a checkpoint, refused before the server starts
    run_bad(capsys, tmp_path, ["serve", "--checkpoint_dir", empty, "--port", "8765"], str(empty))
    # evaluate: likelihood scoring of free-text outputs (no label set); a split the data does not have
    run_bad(capsys, tmp_path, ["evaluate", "--checkpoint_dir", checkpoint, "--data_dir", data, "--scoring",
                               "likelihood", "--out_dir", tmp_path / "ev"], "label")
    (data / "val.pt").rename(tmp_path / "val.pt")
    run_bad(capsys, tmp_path, ["evaluate", "--checkpoint_dir", checkpoint, "--data_dir", data, "--split", "val",
                               "--out_dir", tmp_path / "ev"], "val.pt")
