"""Exports that prompt exactly as trained (littune/export/template.py): the chat template of `littune export
--format hf|peft|gguf` renders one user message, instruction + "\\n\\n" + input, as the run's prompt.

Oracles: transformers' `apply_chat_template(tokenize=True)` on the exported folder, and for GGUF the file's
tokenizer.chat_template rendered by jinja2 (sandboxed, trim_blocks, lstrip_blocks, as llama.cpp's engine) and
tokenised as llama.cpp tokenises a rendered chat (special tokens parsed, BOS added where tokenizer.ggml.add_bos_token
says); both must give each test record's `input_ids_no_response` as `littune prepare` made it. Checkpoints: the tiny
SmolLM-style Llama of test_export (ChatML, BOS <|im_start|>, no BOS added), the same named like SmolLM2-*-Instruct
(litgpt adds BOS there, and the template itself starts with the BOS text), and one whose tokenizer adds another BOS
(<|endoftext|>).
"""

import json
import shutil
import types
from pathlib import Path

import pytest
import yaml

from conftest import ALPACA_335, SMOLLM2_CHAT_TEMPLATE, make_adapter_run, smol_checkpoint
from littune.cli import main
from littune.prepared import encode, load_tokenizer
from littune.methods.lora import TARGETS
from littune.prompts import load_style_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = 'You are terse. Say "yes" or \\no.'
# checkpoint, --prompt_style, --system
CASES = [("chatml", "chat", None), ("chatml", "chat", SYSTEM), ("chatml", "alpaca", None),
         ("bos-is-im-start", "chat", None), ("bos-is-im-start", "alpaca", None),
         ("adds-bos", "chat", None), ("adds-bos", "chat", SYSTEM), ("adds-bos", "alpaca", None)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("template")
    chatml = smol_checkpoint(root / "tiny-chatml")
    assert main(["convert", "--checkpoint_dir", str(chatml)]) == 0
    # litgpt's Tokenizer adds BOS for a folder named SmolLM2-*-Instruct; its BOS, <|im_start|>, opens the template
    im_start = shutil.copytree(chatml, root / "SmolLM2-tiny-Instruct")
    adds_bos = shutil.copytree(chatml, root / "tiny-adds-bos")
    config = json.loads((adds_bos / "tokenizer_config.json").read_text())
    config.update(bos_token="<|endoftext|>", add_bos_token=True)
    (adds_bos / "tokenizer_config.json").write_text(json.dumps(config))
    records = json.loads(ALPACA_335.read_text())[:40]
    data_file = root / "records.json"
    data_file.write_text(json.dumps(records))
    return {"chatml": chatml, "bos-is-im-start": im_start, "adds-bos": adds_bos, "data_file": data_file}


def trained_run(checkpoints: dict, name: str, style: str, system, folder: Path) -> types.SimpleNamespace:
    """Prepared data (the real CLI) and a LoRA run on it: its prompt_style.yaml and data_dir, random weights."""
    checkpoint = checkpoints[name]
    data = folder / "data"
    assert main(["prepare", "--data_file", str(checkpoints["data_file"]), "--checkpoint_dir", str(checkpoint),
                 "--destination_path", str(data), "--prompt_style", style, "--test_size", "12", "--val_size", "0",
                 "--max_seq_length", "2048", *(["--system", system] if system is not None else [])]) == 0
    run = make_adapter_run(checkpoint, folder / "run", "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                           lora_targets=list(TARGETS))
    shutil.copyfile(data / "prompt_style.yaml", run / "prompt_style.yaml")  # as finetune keeps the data's style
    hparams = yaml.safe_load((run / "hyperparameters.yaml").read_text())
    (run / "hyperparameters.yaml").write_text(yaml.dump({**hparams, "data_dir": str(data)}))
    import torch

    records = torch.load(data / "test.pt", weights_only=True)
    return types.SimpleNamespace(checkpoint=checkpoint, run=run, records=records,
                                 use_bos=json.loads((data / "prepare.json").read_text())["tokenizer"]["use_bos"])


def export(checkpoint: Path, out: Path, format: str, *extra) -> Path:
    assert main(["export", "--checkpoint_dir", str(checkpoint), "--format", format, "--out_dir", str(out),
                 *map(str, extra)]) == 0
    return out


def user_message(record: dict) -> list[dict]:
    """The conversation of one record, as littune's chat style builds the user message."""
    return [{"role": "user", "content": record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")}]


def transformers_ids(folder: Path, conversations: list[list[dict]]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def card_example(folder: Path) -> list[dict]:
    """The user message the model card's prompt section shows."""
    line = next(line for line in (folder / "README.md").read_text(encoding="utf-8").splitlines()
                if line.startswith("messages = "))
    return json.loads(line.removeprefix("messages = "))


def llama_cpp_ids(gguf_file: Path, records: list[dict]) -> tuple[list[list[int]], dict]:
    """What llama.cpp feeds the model for each record's chat: the template rendered (jinja2 as llama.cpp's engine:
    sandboxed, trim_blocks, lstrip_blocks, bos_token/eos_token as the vocabulary's texts), tokenised with special
    tokens parsed, BOS first where tokenizer.ggml.add_bos_token is true."""
    import gguf
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from littune.checkpoints.gguf import build_tokenizer, read_metadata

    meta = read_metadata(gguf.GGUFReader(gguf_file))
    tokenizer = build_tokenizer(meta, str(gguf_file))[0]  # the file's vocabulary, control tokens as special tokens

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(meta["tokenizer.chat_template"])
    tokens = meta["tokenizer.ggml.tokens"]
    specials = {"bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]],
                "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]]}
    bos = [meta["tokenizer.ggml.bos_token_id"]] if meta["tokenizer.ggml.add_bos_token"] else []
    out = []
    for record in records:
        text = template.render(messages=user_message(record), add_generation_prompt=True,
                               raise_exception=raise_exception, **specials)
        out.append(bos + tokenizer.encode(text, add_special_tokens=False).ids)
    return out, meta


@pytest.mark.parametrize("name, style, system", CASES)
def test_exported_templates_give_the_trained_prompt_ids(checkpoints, tmp_path, name, style, system):
    r = trained_run(checkpoints, name, style, system, tmp_path)
    expected = [record["input_ids_no_response"].tolist() for record in r.records]
    assert {bool(record["input"]) for record in r.records} == {True, False}  # with and without an input
    bos_token = 0 if name == "adds-bos" else 1  # <|endoftext|>, <|im_start|>
    assert r.use_bos == (name != "chatml") and all(ids[0] == bos_token for ids in expected if r.use_bos)

    hf = export(r.checkpoint, tmp_path / "hf", "hf", "--adapter_path", r.run)
    # the model card's example message gives the card's example prompt (the run has no evaluation: placeholders)
    card_prompt = encode(load_tokenizer(r.checkpoint), load_style_file(r.run).apply("INSTRUCTION", input="INPUT"))
    assert transformers_ids(hf, [user_message(record) for record in r.records] + [card_example(hf)]) == [
        *expected, card_prompt.tolist()]
    template = (hf / "chat_template.jinja").read_text(encoding="utf-8")
    assert json.loads((hf / "tokenizer_config.json").read_text())["chat_template"] == template

    gguf_folder = export(r.checkpoint, tmp_path / "gguf", "gguf", "--adapter_path", r.run, "--dtype", "float32")
    got, meta = llama_cpp_ids(next(gguf_folder.glob("*.gguf")), r.records)
    assert got == expected
    # llama.cpp adds the BOS (the template leaves it out), and no EOS after the prompt
    assert meta["tokenizer.ggml.add_bos_token"] is r.use_bos and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.bos_token_id"] == bos_token

    if (name, system) == ("chatml", SYSTEM):  # the PEFT folder carries the same template
        peft = export(r.checkpoint, tmp_path / "peft", "peft", "--adapter_path", r.run)
        assert (peft / "chat_template.jinja").read_text(encoding="utf-8") == template
        assert transformers_ids(peft, [user_message(record) for record in r.records]) == expected
        # a merged checkpoint carries its run's style: its export prompts as the run was trained
        merged = tmp_path / "merged"
        assert main(["merge", "--checkpoint_dir", str(r.checkpoint), "--adapter_path", str(r.run),
                     "--out_dir", str(merged)]) == 0
        from_merged = export(merged, tmp_path / "hf-merged", "hf")
        assert (from_merged / "chat_template.jinja").read_text(encoding="utf-8") == template


def test_a_base_model_export_keeps_its_own_template(checkpoints, tmp_path):
    checkpoint = checkpoints["chatml"]
    base_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    hf = export(checkpoint, tmp_path / "hf", "hf")
    assert not (hf / "chat_template.jinja").exists()
    assert json.loads((hf / "tokenizer_config.json").read_text()) == base_config


@pytest.mark.parametrize("use_bos", [False, True])
def test_every_litgpt_style_and_a_real_chat_template_render_as_littune_prompts(use_bos):
    """Text level, for every litgpt style and SmolLM2's own template (with and without --system): the transformers
    template gives littune's prompt text (BOS first where littune's tokenizer puts it), the GGUF one the same
    without the leading BOS; a system message in the conversation wins over the run's."""
    from litgpt.prompts import prompt_styles

    from littune.export.template import RunPrompt, chat_template
    from littune.prompts import ChatTemplate, render_chat_template

    bos = "<s>"
    base = SMOLLM2_CHAT_TEMPLATE.read_text(encoding="utf-8")
    styles = [cls() for cls in prompt_styles.values()]
    styles += [ChatTemplate(base, bos_token=bos, system=system, strip_bos=use_bos) for system in (None, SYSTEM)]
    records = [("Name a color.", ""), ('Quote: "a" \\ {{ b }} {% c %} ünï', "le  chat\n\nnoir\n"), ("", "x"),
               ("tab\there", "  ")]
    for style in styles:
        prompt = RunPrompt(style, use_bos, bos, 1)
        templates = {gguf: chat_template(prompt, gguf=gguf) for gguf in (False, True)}
        for instruction, input_text in records:
            text = style.apply(instruction, input=input_text)
            if use_bos:
                text = bos + text.removeprefix(bos)
            messages = [{"role": "user", "content": instruction + (f"\n\n{input_text}" if input_text else "")}]
            for gguf, expected in ((False, text), (True, text[len(bos):] if use_bos else text)):
                assert render_chat_template(templates[gguf], messages, True, {}) == expected, (style, gguf)
        if isinstance(style, ChatTemplate):
            conversation = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi."}]
            expected = style.render(conversation, add_generation_prompt=True)
            expected = bos + expected.removeprefix(bos) if use_bos else expected
            assert render_chat_template(templates[False], conversation, True, {}) == expected
