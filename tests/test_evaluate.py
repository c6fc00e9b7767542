"""`littune evaluate`: likelihood scoring (the default for label tasks) and generation scoring through the real CLI,
batched greedy == one-by-one greedy, metrics == scikit-learn's, the test loss, files and pictures, precision, errors.

One tiny GPT-NeoX (real Pythia tokenizer), 120 real SST-2 sentences prepared with `--columns`, a short adapter
run, then the real CLI. The adapter is trained just long enough to answer with a label word. The scoring functions
themselves are tested in test_scoring.py.
"""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import (ALPACA_335, SST2_TRAIN, assert_clean_error, finetune_argv, make_hf_checkpoint, one_error_line,
                      run_cli, run_main)
from littune import metrics as label_metrics
from littune import sampling
from littune.cli import main

SST2_COLUMNS = json.dumps({"instruction": "=Is the sentiment of this review positive or negative?", "input": "text",
                           "output": "label"})
SST2_VALUES = json.dumps({"1": "positive", "0": "negative"})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-neox"
    make_hf_checkpoint(folder, "gpt_neox", num_hidden_layers=4, seed=1)  # adapter prefixes start at layer 2
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def sst2(checkpoint, tmp_path_factory) -> Path:
    """The first 120 SST-2 training sentences, prepared by the real CLI with --columns; 40 go to the test split."""
    folder = tmp_path_factory.mktemp("sst2")
    lines = SST2_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:121]  # header + 120 rows
    (folder / "sst2_120.tsv").write_text("".join(lines), encoding="utf-8")
    assert main(["prepare", "--data_file", str(folder / "sst2_120.tsv"), "--checkpoint_dir", str(checkpoint),
                 "--destination_path", str(folder / "data"), "--test_size", "40", "--mask_inputs", "true",
                 "--columns", SST2_COLUMNS, "--output_values", SST2_VALUES]) == 0
    return folder / "data"


@pytest.fixture(scope="module")
def run_dir(checkpoint, sst2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "sst2"
    assert main(finetune_argv(checkpoint, sst2, out, "--max_steps", "8", "--batch_size", "8", "--micro_batch_size", "8",
                              "--learning_rate", "0.3", "--lr_schedule", "constant", "--warmup_steps", "0",
                              "--eval_interval", "4", "--eval_iters", "1", "--save_interval", "100")) == 0
    return out


@pytest.fixture(scope="module")
def evaluation(checkpoint, sst2, run_dir) -> Path:
    """`littune evaluate --scoring generate` with the default out_dir; batch size 7 does not divide the 40 test
    records."""
    assert main(["evaluate", "--checkpoint_dir", str(checkpoint), "--adapter_path", str(run_dir),
                 "--data_dir", str(sst2), "--batch_size", "7", "--max_new_tokens", "1", "--scoring", "generate"]) == 0
    return run_dir / "eval"


@pytest.fixture(scope="module")
def likelihood(checkpoint, sst2, run_dir, tmp_path_factory) -> Path:
    """`littune evaluate` with the default scoring (likelihood: the label set is known), batch size 7."""
    out = tmp_path_factory.mktemp("likelihood")
    assert main(["evaluate", "--checkpoint_dir", str(checkpoint), "--adapter_path", str(run_dir),
                 "--data_dir", str(sst2), "--batch_size", "7", "--out_dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def inference(checkpoint, run_dir):
    """The adapter model as `littune generate` loads it: (model, tokenizer, prompt style)."""
    import lightning as L

    from litgpt.prompts import Alpaca

    from littune.inputs import load_for_inference

    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    model, tokenizer, _ = load_for_inference(fabric, checkpoint, run_dir)
    return model, tokenizer, Alpaca()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sklearn_view(expected: list[str], predicted: list[str], labels: list[str]) -> tuple[list, list]:
    """y_true, y_pred as scikit-learn gets them: normalised strings, "other" for a prediction that is no label."""
    y_true = [e.strip().lower() for e in expected]
    y_pred = [p.strip().lower() if p.strip().lower() in labels else "other" for p in predicted]
    return y_true, y_pred


def assert_sklearn_parity(metrics: dict, y_true: list, y_pred: list, labels: list[str]) -> None:
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, matthews_corrcoef,
                                 precision_recall_fscore_support)

    approx = dict(rel=1e-12, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), **approx)
    assert metrics["f1_macro"] == pytest.approx(
        f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0), **approx)
    assert metrics["f1_micro"] == pytest.approx(
        f1_score(y_true, y_pred, labels=labels, average="micro", zero_division=0), **approx)
    assert metrics["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred), **approx)
    cm = confusion_matrix(y_true, y_pred, labels=labels + ["other"])
    assert metrics["confusion_matrix"] == cm[:len(labels)].tolist()  # the "other" row of sklearn is all zeros
    assert cm[len(labels)].sum() == 0
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        got = metrics["per_class"][label]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision[i], recall[i], f1[i]), **approx)
        assert got["support"] == support[i]
    assert metrics["not_a_label"] == y_pred.count("other")


# ------------------------------------------------------------------------------------------------ pure metrics


def test_metrics_equal_sklearn_on_synthetic_labels_with_predictions_outside_the_set():
    rng = random.Random(0)
    labels = ["cat", "dog", "fish"]
    expected = [rng.choice(labels) for _ in range(300)]
    noisy = {"cat": [" Cat", "CAT\n"], "dog": ["dog ", "Dog"], "fish": ["fish"]}
    predicted = []
    for e in expected:
        roll = rng.random()
        if roll < 0.55:
            predicted.append(rng.choice(noisy[e]))  # right, with case and whitespace variants
        elif roll < 0.85:
            predicted.append(rng.choice(noisy[rng.choice(labels)]))  # some label
        else:
            predicted.append(rng.choice(["a cat", "", "cats", "other"]))  # none of the labels
    metrics = label_metrics.classification_metrics(expected, predicted, labels)
    y_true, y_pred = sklearn_view(expected, predicted, labels)
    assert 20 < y_pred.count("other") < 80
    assert_sklearn_parity(metrics, y_true, y_pred, labels)
    assert metrics["accuracy"] != metrics["f1_micro"]  # "other" lowers micro recall, not micro precision
    assert sum(map(sum, metrics["confusion_matrix"])) == 300 and len(metrics["confusion_matrix"][0]) == 4

    # a label never predicted (zero division -> 0), all predictions outside the set (MCC 0), perfect predictions
    for predicted in (["cat"] * 150 + ["dog"] * 150, ["???"] * 300, list(expected)):
        metrics = label_metrics.classification_metrics(expected, predicted, labels)
        assert_sklearn_parity(metrics, *sklearn_view(expected, predicted, labels), labels)
    assert metrics["accuracy"] == metrics["f1_macro"] == metrics["mcc"] == 1.0

    assert label_metrics.exact_match(["Yes ", "no"], ["yes", "no."]) == 0.5
    assert set(label_metrics.classification_metrics(["a"], ["a"], None).values()) == {None}


def test_label_set_detection_and_parsing():
    from littune.common import UserError

    assert label_metrics.detect_labels(["positive", "Negative ", "negative", "positive"]) == ["negative", "positive"]
    assert label_metrics.detect_labels(["yes", "yes", "no"]) is None  # a value seen once: free text, not labels
    assert label_metrics.detect_labels(["yes"] * 5) is None  # one value is not a classification
    assert label_metrics.detect_labels([f"l{i}" for i in range(64)] * 2) is not None  # 64 classes: still labels
    assert label_metrics.detect_labels([f"l{i}" for i in range(65)] * 2) is None
    alpaca_outputs = [r["output"] for r in json.loads(ALPACA_335.read_text())[:50]]
    assert label_metrics.detect_labels(alpaca_outputs) is None
    assert label_metrics.parse_labels(" Positive, negative ,neutral") == ["positive", "negative", "neutral"]
    with pytest.raises(UserError, match="at least 2"):
        label_metrics.parse_labels("positive,")
    with pytest.raises(UserError, match="given twice"):
        label_metrics.parse_labels("yes,YES")


# ------------------------------------------------------------------------------------------- batched generation


@pytest.fixture(scope="module")
def perturbed_adapter(checkpoint, tmp_path_factory) -> Path:
    """An adapter file moved away from its identity values (seeded), as after real training: the prefix and gates,
    the linear scales, the attention/MLP input biases and the norm weights. Biases added straight to the residual
    stream or the logits stay 0: on a random tiny model they would swamp the prompt and give one constant answer."""
    from littune.checkpoints import load_model_config
    from littune.methods.adapter_v2 import METHOD

    torch.manual_seed(3)
    model = METHOD.build_model(load_model_config(checkpoint), METHOD.args())
    kept = ("lm_head", "ln_f", "norm_1.bias", "norm_2.bias", "proj.adapter_bias")
    adapter = {}
    for name, p in model.state_dict().items():
        if not METHOD.is_trainable(name):
            continue
        if "gating_factor" in name:
            adapter[name] = torch.full_like(p, 0.5)
        elif any(k in name for k in kept):
            adapter[name] = p.clone()
        else:
            adapter[name] = p + 0.05 * torch.randn_like(p) * (p.abs().mean() + 1)
    path = tmp_path_factory.mktemp("adapter") / "adapter.pth"
    torch.save(adapter, path)
    return path


def pick_stop_sequences(outputs: list[list[int]], eos_id: int) -> tuple:
    """EOS, the single token that ends rows at the most different steps, and a two-token sequence whose first token
    also occurs without the second (held back, then released)."""
    def first_positions(token):
        return {out.index(token) if token in out else None for out in outputs}

    single = max(sorted({t for out in outputs for t in out[1:]}), key=lambda t: len(first_positions(t)))
    for out in outputs:
        for i in range(len(out) - 1):
            a, b = out[i], out[i + 1]
            if single not in (a, b) and any(a in o[:-1] and o[o.index(a) + 1] != b for o in outputs):
                return [eos_id], [single], [a, b]
    return [eos_id], [single]


@pytest.mark.parametrize("arch, with_adapter", [("gpt_neox", False), ("gpt_neox", True), ("llama", False),
                                                ("falcon", False)])
def test_batched_greedy_equals_one_by_one_for_every_prompt(checkpoint, perturbed_adapter, tmp_path, arch,
                                                           with_adapter):
    """Prompts of very different lengths, batch size 5 for 23 prompts, stop sequences that end rows at different
    steps: the tokens of litgpt's generate_fn (`littune generate`), one prompt at a time. GPT-NeoX (multi-head,
    partial rotary, with and without adapter), Llama (grouped-query attention, SentencePiece), Falcon (multi-query)."""
    import lightning as L
    from litgpt.prompts import Alpaca

    from littune.inputs import load_for_inference
    from littune.sampling import generate_tokens

    if arch != "gpt_neox":
        checkpoint = tmp_path / f"tiny-{arch}"
        make_hf_checkpoint(checkpoint, arch, seed=1, initializer_range=0.2)  # larger weights: answers vary by prompt
        assert main(["convert", "--checkpoint_dir", str(checkpoint)]) == 0
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    model, tokenizer, _ = load_for_inference(fabric, checkpoint, perturbed_adapter if with_adapter else None)
    records = json.loads(ALPACA_335.read_text())
    records = sorted(records, key=lambda r: len(r["instruction"]) + len(r["input"]))
    chosen = records[:8] + records[len(records) // 2:][:7] + records[-8:]
    prompts = [tokenizer.encode(Alpaca().apply(r["instruction"], input=r["input"])) for r in chosen]
    lengths = sorted(len(p) for p in prompts)
    assert len(prompts) == 23 and lengths[-1] > 3 * lengths[0], lengths

    new = 10
    free = sampling.batched_greedy(model, prompts, new, (), batch_size=23)  # only to pick stop sequences from
    assert len({tuple(out) for out in free}) > 5  # the answers depend on the prompt
    stops = pick_stop_sequences(free, tokenizer.eos_id)
    reference = [list(generate_tokens(model, p, new, temperature=0.0, stop_tokens=stops)) for p in prompts]
    assert len({len(r) for r in reference}) >= 3, reference  # rows end at different steps, some at the limit
    assert max(len(r) for r in reference) == new

    assert sampling.batched_greedy(model, prompts, new, stops, batch_size=5) == reference


def test_stop_matcher_holds_back_and_drops_a_completed_sequence():
    matcher = sampling.StopMatcher([[7, 8, 9], [5]])
    for token in (1, 7, 8):
        matcher.add(token)
    assert not matcher.stopped and matcher.safe == 1  # 7, 8 may start the stop sequence 7 8 9
    matcher.add(2)
    assert matcher.safe == 4 and matcher.output == [1, 7, 8, 2]
    for token in (7, 8, 9):
        matcher.add(token)
    assert matcher.stopped and matcher.output == [1, 7, 8, 2]


# ---------------------------------------------------------------------------------------------- the CLI run


def test_cli_writes_predictions_metrics_and_pictures(evaluation, sst2):
    from matplotlib.image import imread

    from littune.prepared import load_prepared

    _, test, _ = load_prepared(sst2)
    predictions = read_jsonl(evaluation / "predictions.jsonl")
    assert [(p["instruction"], p["input"], p["expected"]) for p in predictions] == \
        [(r["instruction"], r["input"], r["output"]) for r in test]  # the split's order, every record
    assert all(set(p) == {"instruction", "input", "expected", "predicted", "prompt", "prompt_ids"} for p in predictions)
    assert [p["prompt_ids"] for p in predictions] == [r["input_ids_no_response"].tolist() for r in test]
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["labels"] == ["negative", "positive"] and metrics["records"] == 40
    for key in ("exact_match", "accuracy", "f1_macro", "f1_micro", "mcc", "per_class", "confusion_matrix",
                "test_loss", "perplexity", "not_a_label"):
        assert metrics[key] is not None, key
    assert sum(map(sum, metrics["confusion_matrix"])) == 40
    for name in ("confusion_matrix.png", "loss.png"):
        image = imread(evaluation / name)
        assert image.shape[0] > 200 and image.shape[1] > 250, (name, image.shape)
        assert image[..., :3].std() > 0.05, name  # not a blank canvas
    assert not list(evaluation.glob("*.tmp")) and not list(evaluation.glob(".*"))


def test_cli_likelihood_scores_every_label_after_the_prompt(likelihood, inference, sst2):
    """predictions.jsonl under likelihood scoring: prompt_ids + a label's ids is exactly the sequence scored (checked
    with a plain forward of the adapter model), the prediction is the argmax, and metrics.json agrees."""
    from littune.prepared import load_prepared

    model, tokenizer, style = inference
    _, test, _ = load_prepared(sst2)
    predictions = read_jsonl(likelihood / "predictions.jsonl")
    metrics = json.loads((likelihood / "metrics.json").read_text())
    assert metrics["scoring"] == "likelihood" and metrics["precision"] == "32-true"
    assert metrics["labels"] == ["negative", "positive"] and metrics["not_a_label"] == 0
    assert metrics["max_new_tokens"] is None
    for record, p in zip(test, predictions, strict=True):
        assert set(p) == {"instruction", "input", "expected", "predicted", "predicted_norm", "prompt", "prompt_ids",
                          "choices"}
        assert p["prompt"] == style.apply(record["instruction"], input=record["input"])
        assert p["prompt_ids"] == record["input_ids_no_response"].tolist()
        assert list(p["choices"]) == ["negative", "positive"]
        for label, choice in p["choices"].items():
            sequence = p["prompt_ids"] + choice["ids"]
            assert sequence == tokenizer.encode(p["prompt"] + label).tolist() + [tokenizer.eos_id]
            with torch.no_grad():
                logits = model(torch.tensor([sequence[:-1]]))[0]
            logprobs = torch.log_softmax(logits, dim=-1)[len(p["prompt_ids"]) - 1:]
            direct = float(logprobs.gather(1, torch.tensor(choice["ids"])[:, None]).sum())
            assert choice["logprob"] == pytest.approx(direct, abs=1e-4)
        logprobs = {label: c["logprob"] for label, c in p["choices"].items()}
        assert p["predicted"] == max(logprobs, key=logprobs.get)
    expected = [p["expected"] for p in predictions]
    assert metrics["accuracy"] == sum(p["predicted"] == p["expected"] for p in predictions) / 40
    assert metrics["accuracy_norm"] == sum(p["predicted_norm"] == p["expected"] for p in predictions) / 40
    assert_sklearn_parity(metrics, *sklearn_view(expected, [p["predicted"] for p in predictions], metrics["labels"]),
                          metrics["labels"])


def test_cli_bf16_on_cpu(checkpoint, sst2, run_dir, likelihood, tmp_path):
    out = tmp_path / "bf16"
    assert main(["evaluate", "--checkpoint_dir", str(checkpoint), "--adapter_path", str(run_dir),
                 "--data_dir", str(sst2), "--precision", "bf16-true", "--out_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    reference = json.loads((likelihood / "metrics.json").read_text())
    assert metrics["precision"] == "bf16-true" and metrics["scoring"] == "likelihood"
    assert metrics["test_loss"] == pytest.approx(reference["test_loss"], rel=0.05)
    for got, want in zip(read_jsonl(out / "predictions.jsonl"), read_jsonl(likelihood / "predictions.jsonl")):
        assert got["prompt_ids"] == want["prompt_ids"]
        for label in want["choices"]:
            assert got["choices"][label]["logprob"] == pytest.approx(want["choices"][label]["logprob"], abs=0.3)


def test_cli_predictions_equal_one_by_one_generate(evaluation, inference, sst2):
    from littune.prepared import load_prepared
    from littune.sampling import generate_tokens

    model, tokenizer, style = inference
    _, test, _ = load_prepared(sst2)
    predictions = read_jsonl(evaluation / "predictions.jsonl")
    for record, p in zip(test, predictions, strict=True):
        alone = generate_tokens(model, record["input_ids_no_response"], 1, temperature=0.0,
                                stop_tokens=style.stop_tokens(tokenizer))
        assert p["predicted"] == tokenizer.decode(torch.tensor(list(alone), dtype=torch.int64))


def test_metrics_json_equals_sklearn_on_the_runs_predictions(evaluation):
    metrics = json.loads((evaluation / "metrics.json").read_text())
    predictions = read_jsonl(evaluation / "predictions.jsonl")
    expected = [p["expected"] for p in predictions]
    predicted = [p["predicted"] for p in predictions]
    assert_sklearn_parity(metrics, *sklearn_view(expected, predicted, metrics["labels"]), metrics["labels"])
    assert metrics["exact_match"] == sum(e.strip().lower() == p.strip().lower()
                                         for e, p in zip(expected, predicted)) / 40


@pytest.mark.parametrize("scoring", ["generate", "likelihood"])
def test_test_loss_is_the_mean_over_target_tokens(scoring, request, inference, sst2):
    """Recomputed record by record with a plain forward pass: sum of token losses / target tokens (under likelihood
    scoring the loss comes from the label pass)."""
    from littune.prepared import load_prepared

    evaluation = request.getfixturevalue({"generate": "evaluation", "likelihood": "likelihood"}[scoring])
    model, _, _ = inference
    _, test, meta = load_prepared(sst2)
    total, targets = 0.0, 0
    with torch.no_grad():
        for r in test:
            logits = model(r["input_ids"][None])[0, :-1]
            labels = r["labels"][1:]
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=meta["ignore_index"],
                                                       reduction="sum").item()
            targets += int((labels != meta["ignore_index"]).sum())
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["test_loss"] == pytest.approx(total / targets, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / targets), rel=1e-5)


def test_explicit_labels_and_free_text_task_without_adapter(checkpoint, sst2, tmp_path, monkeypatch, capsys):
    import lightning as L

    from littune.prepared import load_prepared
    from littune.inputs import load_for_inference
    from littune.sampling import generate_tokens

    from littune.evaluate import label_answer_tokens
    from littune.prepared import load_tokenizer

    # --labels in its own order, one label nobody expects; explicit --out_dir; no run folder, so no loss.png;
    # --max_new_tokens left to its default for a label task: the longest label's tokens + 4
    out = tmp_path / "labels3"
    assert main(["evaluate", "--checkpoint_dir", str(checkpoint), "--data_dir", str(sst2), "--out_dir", str(out),
                 "--labels", "positive,negative,neutral", "--batch_size", "16", "--scoring", "generate"]) == 0
    answer_tokens = label_answer_tokens(load_tokenizer(checkpoint), ["positive", "negative", "neutral"])
    assert json.loads((out / "metrics.json").read_text())["max_new_tokens"] == answer_tokens
    assert 5 <= answer_tokens <= 12
    # the base model's answers (several tokens, many different) are the ones littune generate gives one by one
    from litgpt.prompts import Alpaca

    model, tokenizer, _ = load_for_inference(L.Fabric(devices=1, accelerator="cpu", precision="32-true"), checkpoint)
    style = Alpaca()
    predictions = read_jsonl(out / "predictions.jsonl")
    for record, p in zip(load_prepared(sst2)[1], predictions, strict=True):
        alone = generate_tokens(model, record["input_ids_no_response"], answer_tokens, temperature=0.0,
                                stop_tokens=style.stop_tokens(tokenizer))
        assert p["predicted"] == tokenizer.decode(torch.tensor(list(alone), dtype=torch.int64))
    assert len({p["predicted"] for p in predictions}) > 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["positive", "negative", "neutral"] and metrics["per_class"]["neutral"]["support"] == 0
    y_true, y_pred = sklearn_view([p["expected"] for p in predictions], [p["predicted"] for p in predictions],
                                  metrics["labels"])
    assert_sklearn_parity(metrics, y_true, y_pred, metrics["labels"])
    assert (out / "confusion_matrix.png").is_file() and not (out / "loss.png").exists()
    table = capsys.readouterr().out
    assert "accuracy" in table and "neutral" in table and "expected \\ predicted" in table

    # free-text outputs (Alpaca): exact match and loss only; default folder out/eval/<data folder name>
    source = tmp_path / "alpaca20.json"
    source.write_text(json.dumps(json.loads(ALPACA_335.read_text())[:20]))
    assert main(["prepare", "--data_file", str(source), "--checkpoint_dir", str(checkpoint), "--destination_path",
                 str(tmp_path / "alpaca20"), "--test_size", "5", "--max_seq_length", "200"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--checkpoint_dir", str(checkpoint), "--data_dir", str(tmp_path / "alpaca20"),
                 "--max_new_tokens", "3"]) == 0
    out = tmp_path / "out" / "eval" / "alpaca20"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("labels", "accuracy", "f1_macro", "f1_micro", "mcc", "per_class", "confusion_matrix"):
        assert metrics[key] is None, key
    assert metrics["records"] == 5 and math.isfinite(metrics["test_loss"]) and metrics["exact_match"] == 0.0
    assert metrics["scoring"] == "generate" and metrics["accuracy_norm"] is None  # free text: generation
    assert metrics["max_new_tokens"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.jsonl"]


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_input_gives_one_clear_line(checkpoint, sst2, run_dir, tmp_path, capsys):
    def run(*flags, data=sst2):
        result = run_main(capsys, "evaluate", "--checkpoint_dir", checkpoint, "--data_dir", data, "--out_dir",
                          tmp_path / "out", *flags)
        one_error_line(result, alone=True)
        return result

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run(data=empty), str(empty), "test.pt", "littune prepare")
    assert_clean_error(run("--split", "validation"), "--split 'validation'", "test, val, train")
    assert_clean_error(run("--batch_size", 0), "--batch_size 0: must be >= 1")
    assert_clean_error(run("--max_new_tokens", 0), "--max_new_tokens 0: must be >= 1")
    assert_clean_error(run("--scoring", "loglik"), "--scoring 'loglik'", "likelihood", "generate")
    assert_clean_error(run("--precision", "16-true"), "--precision 16-true needs a CUDA GPU")
    assert_clean_error(run("--labels", "positive"), "at least 2 labels")
    assert_clean_error(run("--labels", "good,bad"), "not one of the labels")
    assert_clean_error(run("--adapter_path", tmp_path / "nope.pth"), "nope.pth", "no such file")
    assert_clean_error(run("--adapter_path", empty), "must hold the final adapter")
    assert_clean_error(run("--max_new_tokens", 1000, "--scoring", "generate"), "exceeds", "256")
    free_text = tmp_path / "alpaca12"
    (tmp_path / "alpaca12.json").write_text(json.dumps(json.loads(ALPACA_335.read_text())[:12]))
    assert main(["prepare", "--data_file", str(tmp_path / "alpaca12.json"), "--checkpoint_dir", str(checkpoint),
                 "--destination_path", str(free_text), "--test_size", "4", "--max_seq_length", "200"]) == 0
    capsys.readouterr()
    assert_clean_error(run("--scoring", "likelihood", data=free_text), "--scoring likelihood needs a label set",
                       "--labels")
    assert not (tmp_path / "out").exists()

    # and in a real process: exit code 1, one line, no traceback
    result = run_cli("evaluate", "--checkpoint_dir", str(checkpoint), "--data_dir", str(sst2),
                     "--split", "dev", "--out_dir", str(tmp_path / "out"))
    assert result.returncode == 2  # a parse error: --split is declared with its choices
    assert_clean_error(result, "--split 'dev' is not a choice; choose one of test, val, train")
