"""Task metrics while training (label tasks): val_accuracy, val_f1_macro and val_mcc at every evaluation, scored by
likelihood exactly as `littune evaluate --scoring likelihood` scores; best/ and early stopping by the chosen metric;
resume keeps the best."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import SST2_TRAIN, finetune_argv, one_error_line, read_metrics, run_main
from littune.cli import main

COLUMNS = json.dumps({"instruction": "=Is the sentiment of this review positive or negative?", "input": "text",
                      "output": "label"})
VALUES = json.dumps({"1": "positive", "0": "negative"})
ADAPTER = "lit_model_adapter_finetuned.pth"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sst2(small_checkpoint, tmp_path_factory) -> Path:
    """120 SST-2 sentences: 24 validation, 16 test, the rest training."""
    folder = tmp_path_factory.mktemp("sst2")
    lines = SST2_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:121]
    (folder / "sst2.tsv").write_text("".join(lines), encoding="utf-8")
    assert main(["prepare", "--data_file", str(folder / "sst2.tsv"), "--checkpoint_dir", str(small_checkpoint),
                 "--destination_path", str(folder / "data"), "--test_size", "16", "--val_size", "24",
                 "--mask_inputs", "true", "--columns", COLUMNS, "--output_values", VALUES]) == 0
    return folder / "data"


def finetune(checkpoint, data, out, *flags) -> list[str]:
    return finetune_argv(checkpoint, data, out, "--batch_size", "8", "--micro_batch_size", "8", "--learning_rate",
                         "0.05", "--warmup_steps", "0", "--lr_schedule", "constant", "--precision", "32-true",
                         "--eval_iters", "all", "--seed", "3", *flags)


def metric_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if r["val_loss"]]


def validate_adapter(checkpoint: Path, data: Path, adapter_file: Path) -> float:
    """The validation loss of a saved adapter by the training loop's loss pass (`validate`), float32."""
    import lightning as L

    from littune.finetune.evaluation import validate
    from littune.methods.adapter_v2 import METHOD
    from littune.model import load_model
    from littune.prepared import load_prepare_json, load_split

    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    adapter = torch.load(adapter_file, weights_only=True)
    model = load_model(fabric, checkpoint, METHOD, METHOD.args(), adapter=adapter, trainable=True)
    ignore_index = int(load_prepare_json(data).get("ignore_index", -100))
    return validate(fabric, model, METHOD, load_split(data, "val"), 8, ignore_index)


def test_logged_task_metrics_equal_evaluate_on_the_saved_adapter_and_best_is_their_argmax(small_checkpoint, sst2,
                                                                                         tmp_path):
    from littune.finetune import evaluation

    out, loss_passes = tmp_path / "run", []
    with pytest.MonkeyPatch.context() as patch:  # a label task's evaluation is one scoring pass, no loss pass
        patch.setattr(evaluation, "validate", lambda *a, **k: loss_passes.append(a) or 0.0)
        assert main(finetune(small_checkpoint, sst2, out, "--max_steps", 6, "--eval_interval", 2,
                             "--save_interval", 2)) == 0
    assert loss_passes == []
    rows = metric_rows(out)
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(r["val_accuracy"] and r["val_f1_macro"] and r["val_mcc"] and float(r["eval_sec"]) > 0 for r in rows)
    assert len({r["val_loss"] for r in rows}) == 3
    for row in rows:  # the adapter saved at that step, scored by littune evaluate on the same records
        step_dir = out / f"step-{int(row['step']):06d}"
        # the scoring pass's val_loss is the loss pass's (validate: the mean token loss of the training forward)
        assert float(row["val_loss"]) == pytest.approx(validate_adapter(small_checkpoint, sst2, step_dir / ADAPTER),
                                                       rel=2e-5)
        assert main(["evaluate", "--checkpoint_dir", str(small_checkpoint), "--data_dir", str(sst2), "--adapter_path",
                     str(step_dir / ADAPTER), "--split", "val", "--scoring", "likelihood", "--precision", "32-true",
                     "--out_dir", str(tmp_path / f"eval-{row['step']}")]) == 0
        metrics = json.loads((tmp_path / f"eval-{row['step']}" / "metrics.json").read_text())
        assert metrics["records"] == 24
        assert float(row["val_accuracy"]) == pytest.approx(metrics["accuracy"], abs=1e-6)
        assert float(row["val_f1_macro"]) == pytest.approx(metrics["f1_macro"], abs=1e-6)
        assert float(row["val_mcc"]) == pytest.approx(metrics["mcc"], abs=1e-5)
    # evaluate plots the curves the run logged: loss and each task metric against the step
    from matplotlib.image import imread

    image = imread(tmp_path / f"eval-{rows[-1]['step']}" / "curves.png")
    assert image.shape[1] > 2 * image.shape[0] * 0.9 and image[..., :3].std() > 0.05
    # best/: the default metric of a label task, its first maximum over the evaluations
    info = json.loads((out / "best" / "adapter_info.json").read_text())
    values = [float(r["val_mcc"]) for r in rows]
    best = rows[values.index(max(values))]
    assert info["metric"] == "val_mcc" and info["step"] == int(best["step"])
    assert info["value"] == pytest.approx(float(best["val_mcc"]), abs=1e-5)
    assert info["val_accuracy"] == pytest.approx(float(best["val_accuracy"]), abs=1e-6)
    best_weights = torch.load(out / "best" / ADAPTER, weights_only=True)
    step_weights = torch.load(out / f"step-{info['step']:06d}" / ADAPTER, weights_only=True)
    assert all(torch.equal(best_weights[k], step_weights[k]) for k in best_weights)


@pytest.mark.parametrize("metric", ["val_accuracy", "val_loss"])
def test_early_stopping_follows_the_chosen_metric(small_checkpoint, sst2, tmp_path, metric):
    out = tmp_path / metric
    assert main(finetune(small_checkpoint, sst2, out, "--max_steps", 20, "--eval_interval", 1, "--save_interval",
                         100, "--best_metric", metric, "--early_stopping_patience", 2, "--learning_rate", 0.3)) == 0
    rows = metric_rows(out)
    values = [float(r[metric]) for r in rows]
    sign = -1 if metric == "val_loss" else 1
    best, since, expected_stop = None, 0, None
    for row, value in zip(rows, values):  # the rule, replayed on the logged figures
        if best is None or sign * value > sign * best:
            best, since, best_step = value, 0, int(row["step"])
        else:
            since += 1
        if since >= 2:
            expected_stop = int(row["step"])
            break
    assert expected_stop is not None and int(rows[-1]["step"]) == expected_stop < 20, values
    info = json.loads((out / "best" / "adapter_info.json").read_text())
    assert info["metric"] == metric and info["step"] == best_step


def test_resume_mid_run_keeps_the_best(small_checkpoint, sst2, tmp_path, monkeypatch, capsys):
    flags = ["--max_steps", 8, "--eval_interval", 2, "--save_interval", 2, "--best_metric", "val_accuracy"]
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    assert main(finetune(small_checkpoint, sst2, reference, *flags)) == 0
    step, calls = torch.optim.AdamW.step, {"count": 0}

    def step_then_signal(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step_then_signal)
        assert main(finetune(small_checkpoint, sst2, out, *flags)) == 1
    assert "stopped by SIGTERM after step 5" in capsys.readouterr().err
    state = torch.load(out / "step-000005" / "training_state.pt", weights_only=True)
    assert state["counters"]["best_step"] in (2, 4) and state["counters"]["best_value"] is not None
    assert main([*finetune(small_checkpoint, sst2, out, *flags), "--resume", "auto"]) == 0
    assert json.loads((out / "best" / "adapter_info.json").read_text()) == \
        json.loads((reference / "best" / "adapter_info.json").read_text())
    for column in ("val_loss", "val_accuracy", "val_f1_macro", "val_mcc", "train_loss"):
        assert [r[column] for r in read_metrics(out)] == [r[column] for r in read_metrics(reference)], column
    final = torch.load(out / ADAPTER, weights_only=True)
    expected = torch.load(reference / ADAPTER, weights_only=True)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_task_metric_on_free_text_data_is_refused(small_checkpoint, alpaca64, tmp_path, capsys):
    result = run_main(capsys, *finetune_argv(small_checkpoint, alpaca64, tmp_path / "run", "--best_metric", "val_mcc"))
    one_error_line(result, "not a label task", "--best_metric val_loss", code=1, alone=True)
    assert not (tmp_path / "run").exists()
