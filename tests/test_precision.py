"""The precision chosen on the user's machine when --precision is not given (`littune.precision`): driven through
`littune finetune` with a stubbed probe and a stubbed CPU, so that the results do not depend on this machine."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import finetune_argv
from littune import precision
from littune.checkpoints import load_model_config
from littune.cli import main

BF16_CPU = {"name": "Test CPU with AMX", "flags": {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}}
AVX2_CPU = {"name": "Test CPU, AVX2 only", "flags": {"avx2", "fma"}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the real probe's tiny block included: see conftest


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """This test's CPU and probe: measuring on (the suite turns it off), a cache of its own, the probe's answers
    given by the test and its calls counted."""
    monkeypatch.delenv(precision.PROBE_SWITCH, raising=False)
    monkeypatch.delenv(precision.INHERITED, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = {"cpu": BF16_CPU, "answer": None, "calls": []}
    monkeypatch.setattr(precision, "cpu_info", lambda: state["cpu"])

    def probe(config, training, time_box=precision.TIME_BOX_S):
        state["calls"].append(("training" if training else "inference", config.n_embd))
        return state["answer"]

    monkeypatch.setattr(precision, "probe_block", probe)
    return state


def timings(float32_s: float, bfloat16_s: float) -> dict:
    return {"float32_s": float32_s, "bfloat16_s": bfloat16_s, "tokens": 64, "seconds": 0.3}


def finetune(checkpoint: Path, data: Path, out: Path, capsys, *flags) -> tuple[str, str]:
    """Run a short fine-tuning; (the precision it trained in, its header line)."""
    capsys.readouterr()
    assert main(finetune_argv(checkpoint, data, out, "--max_steps", "2", "--batch_size", "4", "--micro_batch_size",
                              "4", "--eval_interval", "1000", "--eval_iters", "1", "--save_interval", "1", *flags)) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "steps of" in line)
    return yaml.safe_load((out / "hyperparameters.yaml").read_text())["precision"], header


def test_a_fast_bf16_cpu_trains_in_bf16_mixed_once_measured_then_cached_resumed_and_overridden(
        small_checkpoint, alpaca64, tmp_path, machine, capsys):
    machine["answer"] = timings(1.0, 0.4)  # bf16 autocast 2.5x as fast as float32 on the block
    trained, header = finetune(small_checkpoint, alpaca64, tmp_path / "fast", capsys)
    width = load_model_config(small_checkpoint).n_embd
    assert trained == "bf16-mixed" and machine["calls"] == [("training", width)]
    assert "precision bf16-mixed (measured on this CPU" in header and "2.50x" in header
    assert "--precision 32-true to override" in header
    cache = json.loads((tmp_path / "cache" / "littune" / "precision.json").read_text())
    [(key, entry)] = cache.items()
    assert BF16_CPU["name"] in key and f"width {width}" in key and entry["training"]["float32_s"] == 1.0

    machine["answer"] = timings(1.0, 2.0)  # would say float32: a second run on this machine does not ask
    trained, header = finetune(small_checkpoint, alpaca64, tmp_path / "cached", capsys)
    assert trained == "bf16-mixed" and len(machine["calls"]) == 1 and "cached in" in header

    # a resumed run keeps its precision, whatever the machine says now
    (tmp_path / "cache" / "littune" / "precision.json").unlink()
    trained, header = finetune(small_checkpoint, alpaca64, tmp_path / "fast", capsys, "--resume", "auto")
    assert trained == "bf16-mixed" and "kept from the run being resumed" in header and len(machine["calls"]) == 1

    # the flag wins and nothing is measured
    trained, header = finetune(small_checkpoint, alpaca64, tmp_path / "flag", capsys, "--precision", "32-true")
    assert trained == "32-true" and "precision 32-true;" in header and len(machine["calls"]) == 1


def test_a_slow_bf16_cpu_or_one_without_bf16_units_trains_in_float32(small_checkpoint, alpaca64, tmp_path, machine,
                                                                    capsys):
    machine["answer"] = timings(1.0, 0.6)  # bf16 faster on the block, not by enough to survive the whole step
    trained, header = finetune(small_checkpoint, alpaca64, tmp_path / "slow", capsys)
    assert trained == "32-true" and "1.67x" in header and "needs 2x" in header
    assert "--precision bf16-mixed to override" in header
    config = load_model_config(small_checkpoint)
    machine["cpu"], machine["calls"] = AVX2_CPU, []
    precision_, why = precision.cpu_precision(config, training=True)
    assert precision_ == "32-true" and "no bfloat16 units" in why and machine["calls"] == []


def test_probe_answers_cache_and_inference(small_checkpoint, tmp_path, machine):
    config = load_model_config(small_checkpoint)
    cache = tmp_path / "cache" / "littune" / "precision.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")  # damaged: ignored, measured again, written whole
    machine["answer"] = {"timed_out": True}  # a busy machine: 32-true now, measured again next run
    assert precision.cpu_precision(config, training=True)[0] == "32-true" and cache.read_text() == "{not json"
    machine["answer"] = {"too_large": True}  # never fits the box: remembered
    assert precision.cpu_precision(config, training=True)[0] == "32-true"
    assert json.loads(cache.read_text())[precision.cache_key(BF16_CPU["name"], config)] == \
        {"training": {"too_large": True}}
    assert precision.cpu_precision(config, training=True)[0] == "32-true" and len(machine["calls"]) == 2
    # inference: bf16 weights (bf16-true) where the forward is faster in them; training's entry is kept beside it
    machine["answer"] = timings(1.0, 0.4)
    from littune.model import default_precision

    assert default_precision(training=False, config=config) == "bf16-true"
    assert default_precision(training=False) == "32-true"  # without the model's config: nothing to measure
    assert machine["calls"] == [("training", config.n_embd)] * 2 + [("inference", config.n_embd)]
    assert set(json.loads(cache.read_text())[precision.cache_key(BF16_CPU["name"], config)]) == \
        {"training", "inference"}


def test_ranks_take_the_launching_process_decision(small_checkpoint, machine):
    """Under DDP the launching process measures and the ranks it starts inherit its answer; ranks started by another
    launcher (torchrun, several machines) measure nothing, so that all of them choose alike."""
    config = load_model_config(small_checkpoint)
    machine["answer"] = timings(1.0, 0.4)
    with precision.shared_with_ranks("bf16-mixed", "measured"):
        assert precision.run_precision(None, config, None, False, "32-true") == ("bf16-mixed", "measured")
    assert precision.INHERITED not in __import__("os").environ
    assert precision.run_precision(None, config, None, False, "32-true")[0] == "32-true"
    assert machine["calls"] == []


def test_the_real_probe_times_one_block_within_its_box(small_checkpoint):
    config = load_model_config(small_checkpoint)
    for training in (True, False):
        measured = precision.probe_block(config, training)
        assert measured["float32_s"] > 0 and measured["bfloat16_s"] > 0
        assert 16 <= measured["tokens"] <= 128 and measured["seconds"] < precision.TIME_BOX_S + 1


def test_evaluate_generate_and_serve_pick_the_inference_precision_of_this_machine(small_checkpoint, alpaca64,
                                                                                 tmp_path, machine, capsys):
    """bf16-true where one block's forward is >= 1.15x faster in bf16 (the inference rule), with its reason in the
    output; 32-true below that and on a CPU without bf16 units; --precision wins."""
    from littune.serve import load_service

    def evaluated(out, *flags):
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint_dir", str(small_checkpoint), "--data_dir", str(alpaca64),
                     "--out_dir", str(out), *flags]) == 0
        return json.loads((out / "metrics.json").read_text())["precision"], capsys.readouterr().err

    machine["answer"] = timings(1.0, 0.8)  # 1.25x: enough for inference (1.15x), not for training (2x)
    chosen, err = evaluated(tmp_path / "fast")
    assert chosen == "bf16-true" and "precision bf16-true (measured on this CPU" in err and "1.25x" in err
    assert machine["calls"] == [("inference", load_model_config(small_checkpoint).n_embd)]
    assert main(["generate", "--checkpoint_dir", str(small_checkpoint), "--prompt", "Hi", "--max_new_tokens", "2"]) == 0
    assert "precision bf16-true (measured on this CPU earlier, cached" in capsys.readouterr().err
    assert next(iter(load_service(small_checkpoint).models.values())).served.module.lm_head.weight.dtype \
        == __import__("torch").bfloat16
    assert evaluated(tmp_path / "given", "--precision", "32-true")[0] == "32-true"
    machine["cpu"] = AVX2_CPU
    chosen, err = evaluated(tmp_path / "avx2")
    assert chosen == "32-true" and "no bfloat16 units" in err
