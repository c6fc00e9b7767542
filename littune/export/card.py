"""The model card (README.md) every hf and peft export carries: the Hub's YAML metadata (base_model, library_name,
pipeline_tag, tags, licence where the base's is known, model-index from the run's evaluation) and the text a user
needs: how it was trained, on what, the prompt format with an example, how well it does, and how to load it.

Built with huggingface_hub's ModelCardData / EvalResult (the Hub's own schema), from files the run left: its
hyperparameters.yaml, prompt_style.yaml, the prepared data's prepare.json and `littune evaluate`'s eval/metrics.json.
Nothing that locates a machine goes in: no absolute paths, no tracking URIs, no tokens (only file names).
"""

import json
import re
from pathlib import Path
from typing import Optional

import yaml

from littune.checkpoints.origin import REPO_ID, read_origin
from littune.methods import METHODS, get_method
from littune.outbound import outbound

# training flags that name places on this machine or a logger's endpoint, never written into a card
PLACES = {"checkpoint_dir", "data_dir", "out_dir", "resume", "logger", "mlflow_tracking_uri", "tracking_uri"}


def write_model_card(folder: Path, format, checkpoint_dir: Path, config, run_dir: Optional[Path],
                     example: bool = True) -> None:
    """folder/README.md for an export (`format`: its `formats.ExportFormat`) of checkpoint_dir (plus the run in
    run_dir, if any); example: show one test record in the prompt format (false: placeholders)."""
    from littune.common import save_text

    save_text(model_card(format, checkpoint_dir, config, run_dir, example), Path(folder) / "README.md")


def fenced(text: str, language: str) -> str:
    """text in a code fence longer than any run of backticks in it, so that nothing it quotes closes the fence."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def model_card(format, checkpoint_dir: Path, config, run_dir: Optional[Path], example: bool = True) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    checkpoint_dir = Path(checkpoint_dir)
    run = read_run_files(run_dir)
    base = base_model_id(checkpoint_dir, config)
    method = run["hparams"].get("method")
    known = get_method(method) if isinstance(method, str) and method in METHODS else None  # its card label, tags
    evaluation = run["eval"]
    data_name = Path(run["prepare"].get("data_file") or "data").name
    name = run_dir.name if run_dir is not None else config.name
    card_data = ModelCardData(
        model_name=name,
        base_model=base,
        library_name=format.card_library,
        pipeline_tag="text-generation",
        tags=["littune", *([method] if method else []), *(known.card_tags if known else ())],
        license=base_license(checkpoint_dir),
        eval_results=eval_results(evaluation, data_name),
    )
    sections = [f"# {name}", intro(base, config, method, known, format)]
    if run["hparams"]:
        sections.append(training_section(run["hparams"]))
    if run["prepare"]:
        sections.append(data_section(run["prepare"]))
    if run["style"] is not None:
        sections.append(prompt_section(run["style"], run["example"] if example else None))
    if evaluation:
        sections.append(evaluation_section(evaluation))
    load = format.card_load.replace("BASE", base or checkpoint_dir.name)
    sections.append("## How to load it\n\n`PATH` is this folder (or its repo id once uploaded).\n\n" + load)
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"))


def read_run_files(run_dir: Optional[Path]) -> dict:
    """What a run folder says about itself: hyperparameters, prompt style, its data's prepare.json, the evaluation
    of `littune evaluate` (its default folder, RUN/eval) and one of its test records as a prompt example."""
    from littune.prompts import load_style_file

    found = {"hparams": {}, "prepare": {}, "style": None, "eval": {}, "example": None}
    if run_dir is None:
        return found
    run_dir = Path(run_dir)
    found["hparams"] = read_yaml(run_dir / "hyperparameters.yaml")
    if (run_dir / "prompt_style.yaml").is_file():
        found["style"] = load_style_file(run_dir)
    data_dir = found["hparams"].get("data_dir")
    if data_dir:
        found["prepare"] = read_json(Path(data_dir) / "prepare.json")
    found["eval"] = read_json(run_dir / "eval" / "metrics.json")
    predictions = run_dir / "eval" / "predictions.jsonl"
    if predictions.is_file():
        with open(predictions, encoding="utf-8") as f:
            first = f.readline()
        found["example"] = json.loads(first) if first.strip() else None
    return found


def read_yaml(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def base_model_id(checkpoint_dir: Path, config) -> Optional[str]:
    """The base model's Hub repo id: the folder's origin.json (what `download` or a GGUF file's metadata recorded),
    else litgpt's config names it (org/name), else a folder laid out as `littune download` lays it out
    (checkpoints/ORG/NAME); None where none says."""
    recorded = read_origin(checkpoint_dir).get("repo_id")
    if recorded and REPO_ID.fullmatch(recorded):
        return recorded
    hf = getattr(config, "hf_config", None) or {}
    if hf.get("org") and hf.get("name"):
        return f"{hf['org']}/{hf['name']}"
    resolved = Path(checkpoint_dir).resolve()
    candidate = f"{resolved.parent.name}/{resolved.name}"
    return candidate if resolved.parent.parent.name == "checkpoints" and REPO_ID.fullmatch(candidate) else None


def base_license(checkpoint_dir: Path) -> Optional[str]:
    """The licence in the base checkpoint's own model card (README.md metadata), else the one its origin.json
    records (a GGUF file's general.license), where either has one."""
    from huggingface_hub import metadata_load

    readme = Path(checkpoint_dir) / "README.md"
    try:
        metadata = metadata_load(readme) if readme.is_file() else None
    except (ValueError, yaml.YAMLError, UnicodeDecodeError):
        metadata = None
    value = (metadata or {}).get("license")
    return value if isinstance(value, str) else read_origin(checkpoint_dir).get("license")


def eval_results(evaluation: dict, dataset: str) -> Optional[list]:
    """model-index entries for accuracy, macro F1 and MCC of the run's evaluation (label tasks)."""
    from huggingface_hub import EvalResult

    if evaluation.get("accuracy") is None:
        return None
    common = dict(task_type="text-classification", dataset_type=dataset, dataset_name=dataset,
                  dataset_split=evaluation.get("split"))
    figures = [("accuracy", "accuracy", "Accuracy"), ("f1", "f1_macro", "Macro F1"), ("matthews_correlation", "mcc",
                                                                                   "MCC")]
    return [EvalResult(metric_type=kind, metric_value=round(float(evaluation[key]), 4), metric_name=name, **common)
            for kind, key, name in figures if evaluation.get(key) is not None]


def intro(base: Optional[str], config, method: Optional[str], known, format) -> str:
    what = known.card_label if known is not None and known.card_label else "no adapter"
    text = f"{format.card_intro} `{base or config.name}`, trained with littune ({what})."
    return text if method else f"`{base or config.name}` exported by littune (no fine-tuning run)."


def training_section(hparams: dict) -> str:
    rows = [(k, v) for k, v in outbound(hparams).items() if k not in PLACES and not isinstance(v, (dict, list))]
    table = "\n".join(f"| `{k}` | `{v}` |" for k, v in rows)
    return f"## Training\n\n| flag | value |\n| --- | --- |\n{table}"


def data_section(prepare: dict) -> str:
    counts = prepare.get("counts") or {}
    files = [Path(p).name for p in (prepare.get("data_file"), prepare.get("test_file")) if p]
    lines = [f"- files: {', '.join(f'`{f}`' for f in files)}" if files else None,
             f"- records: {', '.join(f'{counts[s]:,} {s}' for s in ('train', 'val', 'test') if s in counts)}"
             if counts else None,
             f"- labels: {', '.join(f'`{label}`' for label in prepare['labels'])}" if prepare.get("labels") else None,
             f"- prompt tokens masked from the loss: {bool(prepare.get('mask_inputs'))}"]
    return "## Data\n\n" + "\n".join(line for line in lines if line)


def prompt_section(style, example: Optional[dict]) -> str:
    from littune.prompts import ChatTemplate

    instruction = example["instruction"] if example else "INSTRUCTION"
    input_text = example["input"] if example else "INPUT"
    prompt = style.apply(instruction, input=input_text)
    name = type(style).__name__
    # the chat template exported with the model (littune/export/template.py) writes this prompt from one user message
    message = {"role": "user", "content": instruction + (f"\n\n{input_text}" if input_text else "")}
    split = "" if isinstance(style, ChatTemplate) else " (the text before the first blank line is the instruction)"
    what = ("One example, a record of the test split as it is (export with `--card_example false` to leave it out):"
            if example else "Its shape:")
    code = (f"messages = [{json.dumps(message, ensure_ascii=False)}]\n"
            f"ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)")
    return (f"## Prompt format\n\nThe model was trained on prompts in the `{name}` style; the answer follows the "
            f"prompt. {what}\n\n{fenced(prompt, 'text')}\n\nThe exported chat template (`chat_template.jinja`; "
            f"`tokenizer.chat_template` in a GGUF file) writes this prompt, BOS included where training had one, from "
            f"one user message: the instruction and the input separated by a blank line{split}.\n\n"
            f"{fenced(code, 'python')}")


def evaluation_section(evaluation: dict) -> str:
    figures = [("accuracy", "accuracy"), ("macro F1", "f1_macro"), ("MCC", "mcc"), ("test loss", "test_loss")]
    rows = "\n".join(f"| {name} | {evaluation[key]:.4f} |" for name, key in figures
                     if isinstance(evaluation.get(key), (int, float)))
    return (f"## Evaluation\n\n`littune evaluate` on the {evaluation.get('split', 'test')} split "
            f"({evaluation.get('records', '?')} records, {evaluation.get('scoring', 'generate')} scoring):\n\n"
            f"| metric | value |\n| --- | --- |\n{rows}")
