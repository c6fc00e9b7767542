"""`littune merge` and `littune export` (hf, peft, gguf) on tiny checkpoints of each family.

The checkpoints are real-format Hugging Face models (conftest's `make_hf_checkpoint`) converted by `littune convert`,
plus a tied Llama with a SmolLM-style byte-level BPE tokenizer and a chat template. LoRA runs are written directly
(random A and B on every target, large enough to move the logits by several units) instead of trained, so that
every exported matrix is exercised. References: littune's own model with the adapter (litgpt's LoRA, unmerged);
readers: transformers, PEFT's `PeftModel.from_pretrained`, transformers' GGUF loading and littune's GGUF import.
"""

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from conftest import (SMOL_CHAT_TEMPLATE, SMOL_TEXTS, lit_logits, make_adapter_run, make_hf_checkpoint,
                      max_diff, one_error_line, run_main, smol_checkpoint)
from littune.cli import main
from littune.methods.lora import TARGETS

TOLERANCE = 1e-4  # float32 logits of the same weights computed by two implementations
CHAT_TEMPLATE, TEXTS = SMOL_CHAT_TEMPLATE, SMOL_TEXTS
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------- helpers


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(ids).logits


def ids_for(checkpoint: Path) -> torch.Tensor:
    from littune.checkpoints import load_model_config

    vocab = load_model_config(checkpoint).padded_vocab_size
    return torch.randint(0, min(vocab, 600), (2, 17), generator=torch.Generator().manual_seed(0))


def export(capsys, *args) -> types.SimpleNamespace:
    capsys.readouterr()
    code = main(["export", *map(str, args)])
    return types.SimpleNamespace(code=code, err=capsys.readouterr().err)


def refused(capsys, command: str, *args) -> str:
    return one_error_line(run_main(capsys, command, *args), code=1)


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """arch -> (converted checkpoint, a LoRA run on every target). GPT-NeoX and Falcon have fused qkv weights;
    Falcon and smol have tied embeddings."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for arch in ("gpt_neox", "falcon", "llama", "smol"):
        folder = root / f"tiny-{arch}"
        if arch == "smol":
            smol_checkpoint(folder)
        else:
            make_hf_checkpoint(folder, arch, seed=1)
        assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
        run = make_adapter_run(folder, root / f"run-{arch}", "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                               lora_targets=list(TARGETS))
        out[arch] = types.SimpleNamespace(checkpoint=folder, run=run, ids=ids_for(folder))
    return out


# ------------------------------------------------------------------------------------------------------ merge


def test_merge_gives_a_checkpoint_with_the_logits_of_base_plus_adapter(models, tmp_path, capsys):
    m = models["llama"]
    out = tmp_path / "merged"
    assert main(["merge", "--checkpoint_dir", str(m.checkpoint), "--adapter_path", str(m.run),
                 "--out_dir", str(out)]) == 0
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.model", "generation_config.json",
            "prompt_style.yaml", "merge.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    merged = torch.load(out / "lit_model.pth", weights_only=True)
    base = torch.load(m.checkpoint / "lit_model.pth", weights_only=True)
    assert set(merged) == set(base) and all(merged[k].dtype == base[k].dtype for k in base)
    with_adapter = lit_logits(m.checkpoint, m.ids, m.run)
    assert max_diff(with_adapter, lit_logits(m.checkpoint, m.ids)) > 1.0  # the adapter matters
    assert max_diff(lit_logits(out, m.ids), with_adapter) <= TOLERANCE
    # generate uses the merged folder as a plain checkpoint
    assert main(["generate", "--prompt", "Name a color.", "--checkpoint_dir", str(out), "--max_new_tokens", "2",
                 "--temperature", "0"]) == 0


# --------------------------------------------------------------------------------------------------------- hf


@pytest.mark.parametrize("arch", ["gpt_neox", "falcon", "llama"])
def test_hf_export_of_a_lora_run_gives_littunes_logits(models, arch, tmp_path):
    import transformers

    m = models[arch]
    out = tmp_path / "hf"
    shards = ["--max_shard_size", "1MB"] if arch == "gpt_neox" else []  # as transformers shards big models
    assert main(["export", "--checkpoint_dir", str(m.checkpoint), "--adapter_path", str(m.run), "--format", "hf",
                 "--out_dir", str(out), *shards]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json"} <= names and names & {"tokenizer.json", "tokenizer.model"}
    if shards:
        # huggingface_hub's split, as save_pretrained: each 12.9 MB embedding alone, the layers in between
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        assert {n for n in names if n.endswith(".safetensors")} == set(index["weight_map"].values())
    else:
        assert "model.safetensors" in names
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert max_diff(hf_logits(model, m.ids), lit_logits(m.checkpoint, m.ids, m.run)) <= TOLERANCE
    # the LoRA changed the head: a tied model (Falcon) is written untied
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False


@pytest.mark.parametrize("arch", ["falcon", "smol"])
def test_hf_export_of_a_base_model_stays_tied_and_converts_back_to_the_same_weights(models, arch, tmp_path):
    import transformers
    from safetensors import safe_open

    m = models[arch]
    out = tmp_path / "hf-base"
    assert main(["export", "--checkpoint_dir", str(m.checkpoint), "--format", "hf", "--out_dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert max_diff(hf_logits(model, m.ids), lit_logits(m.checkpoint, m.ids)) <= TOLERANCE
    # littune convert of the export: the original lit_model.pth, bit for bit (export is convert's inverse)
    assert main(["convert", "--checkpoint_dir", str(out)]) == 0
    before = torch.load(m.checkpoint / "lit_model.pth", weights_only=True)
    after = torch.load(out / "lit_model.pth", weights_only=True)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------------------------------------- peft


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # PEFT: a LoRA on Falcon's tied head
@pytest.mark.parametrize("arch", ["gpt_neox", "falcon", "llama"])
def test_peft_adapter_on_the_original_model_gives_littunes_logits(models, arch, tmp_path):
    import transformers
    from peft import PeftModel

    m = models[arch]
    out = tmp_path / "peft"
    assert main(["export", "--checkpoint_dir", str(m.checkpoint), "--adapter_path", str(m.run), "--format", "peft",
                 "--out_dir", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    # one rank for every module; fused qkv (GPT-NeoX, Falcon) carries q, k and v's ranks side by side
    assert config["r"] == (12 if arch != "llama" else 4) and config["lora_alpha"] / config["r"] == 2
    base = transformers.AutoModelForCausalLM.from_pretrained(m.checkpoint, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    assert max_diff(hf_logits(model, m.ids), lit_logits(m.checkpoint, m.ids, m.run)) <= TOLERANCE


def test_peft_llama_default_targets_are_q_and_v_proj(models, tmp_path):
    import transformers
    from peft import PeftModel

    m = models["llama"]
    run = make_adapter_run(m.checkpoint, tmp_path / "run-qv", "lora", seed=5, lora_r=2, lora_alpha=16,
                           lora_dropout=0.0, lora_targets=["query", "value"])
    out = tmp_path / "peft"
    assert main(["export", "--checkpoint_dir", str(m.checkpoint), "--adapter_path", str(run), "--format", "peft",
                 "--out_dir", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["target_modules"], config["r"], config["lora_alpha"]) == (["q_proj", "v_proj"], 2, 16)
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(m.checkpoint,
                                                                                       dtype=torch.float32), out)
    assert max_diff(hf_logits(model, m.ids), lit_logits(m.checkpoint, m.ids, run)) <= TOLERANCE


# ------------------------------------------------------------------------------------------------------- gguf


def gguf_reads(folder: Path, ids: torch.Tensor, tmp_path: Path) -> tuple:
    """(transformers' logits of the folder's .gguf, littune's logits after `littune convert` of it, that folder)."""
    import transformers

    (gguf_file,) = folder.glob("*.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file.name, dtype=torch.float32)
    converted = tmp_path / f"imported-{gguf_file.stem}"
    converted.mkdir()
    (converted / gguf_file.name).symlink_to(gguf_file)
    assert main(["convert", "--checkpoint_dir", str(converted)]) == 0
    return hf_logits(model, ids), lit_logits(converted, ids), converted


def test_gguf_export_is_read_by_transformers_and_by_littunes_import(models, tmp_path):
    import gguf

    from littune.checkpoints.gguf import read_metadata

    m = models["smol"]
    reference = lit_logits(m.checkpoint, m.ids, m.run)
    out = tmp_path / "gguf-f32"
    assert main(["export", "--checkpoint_dir", str(m.checkpoint), "--adapter_path", str(m.run), "--format", "gguf",
                 "--dtype", "float32", "--out_dir", str(out)]) == 0
    transformers_logits, imported_logits, imported = gguf_reads(out, m.ids, tmp_path)
    assert max_diff(transformers_logits, reference) <= TOLERANCE
    assert max_diff(imported_logits, reference) <= TOLERANCE
    # llama.cpp's layout: names, F32 norms, tokenizer and chat template in the metadata
    reader = gguf.GGUFReader(next(out.glob("*.gguf")))
    meta, names = read_metadata(reader), {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight",
            "blk.1.ffn_down.weight"} <= names  # the head has LoRA: written as output.weight
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    # the run's prompt (make_adapter_run's alpaca style) as the chat template (test_export_template.py checks its ids)
    assert "### Instruction:" in meta["tokenizer.chat_template"] and meta["tokenizer.ggml.model"] == "gpt2"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    # the tokenizer littune rebuilds from the file encodes like the original
    from litgpt import Tokenizer

    original, rebuilt = Tokenizer(m.checkpoint), Tokenizer(imported)
    for text in TEXTS:
        assert original.encode(text).tolist() == rebuilt.encode(text).tolist()

    # q8_0 (the embedding, the head and every matrix quantized, norms F32): both readers agree
    out = tmp_path / "gguf-q8"
    assert main(["export", "--checkpoint_dir", str(m.checkpoint), "--format", "gguf", "--dtype", "q8_0",
                 "--out_dir", str(out)]) == 0
    reader = gguf.GGUFReader(next(out.glob("*.gguf")))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied, no LoRA on the head
    assert read_metadata(reader)["tokenizer.chat_template"] == CHAT_TEMPLATE  # no run: the base's own template
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    transformers_logits, imported_logits, _ = gguf_reads(out, m.ids, tmp_path)
    assert max_diff(transformers_logits, imported_logits) <= TOLERANCE
    assert max_diff(transformers_logits, lit_logits(m.checkpoint, m.ids)) < 0.1  # 8-bit rounding, not an error


def test_gguf_export_with_a_sentencepiece_tokenizer(models, tmp_path):
    """tokenizer.model (Llama 2's) becomes llama.cpp's "llama" vocabulary with scores; read back by littune's import
    (transformers' GGUF reader takes ~15 s over a 32K-token list, and reads the same weights as in the test above)."""
    import gguf

    from littune.checkpoints.gguf import read_metadata

    m = models["llama"]
    out = tmp_path / "gguf"
    assert main(["export", "--checkpoint_dir", str(m.checkpoint), "--adapter_path", str(m.run), "--format", "gguf",
                 "--dtype", "float32", "--out_dir", str(out)]) == 0
    (gguf_file,) = out.glob("*.gguf")
    meta = read_metadata(gguf.GGUFReader(gguf_file))
    assert (meta["tokenizer.ggml.model"], len(meta["tokenizer.ggml.scores"])) == ("llama", 32000)
    imported = tmp_path / "imported"
    imported.mkdir()
    (imported / gguf_file.name).symlink_to(gguf_file)
    assert main(["convert", "--checkpoint_dir", str(imported)]) == 0
    assert max_diff(lit_logits(imported, m.ids), lit_logits(m.checkpoint, m.ids, m.run)) <= TOLERANCE


# ---------------------------------------------------------------------------------------------------- refusals


def test_bad_input_is_refused_with_one_line_and_nothing_written(models, tmp_path, capsys, monkeypatch):
    neox, llama = models["gpt_neox"], models["llama"]
    out = tmp_path / "out"

    # an adapter_v2 run: its prefix attention has no weight to fold into
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "hyperparameters.yaml").write_text("method: adapter_v2\n")
    torch.save({}, v2 / "lit_model_adapter_finetuned.pth")
    for command, extra in (("merge", []), ("export", ["--format", "hf"])):
        line = refused(capsys, command, "--checkpoint_dir", llama.checkpoint, "--adapter_path", v2, "--out_dir", out,
                       *extra)
        assert "adapter_v2" in line and "prefix" in line and "finetune lora" in line
    # a folder that is not a converted checkpoint (HF files only)
    hf_only = tmp_path / "hf-only"
    shutil.copytree(llama.checkpoint, hf_only, ignore=shutil.ignore_patterns("lit_model.pth", "model_config.yaml"))
    assert "convert it first" in refused(capsys, "export", "--checkpoint_dir", hf_only, "--format", "hf",
                                         "--out_dir", out)
    # an adapter trained on another model
    line = refused(capsys, "export", "--checkpoint_dir", llama.checkpoint, "--adapter_path", neox.run, "--format",
                   "peft", "--out_dir", out)
    assert "not an adapter for" in line
    # a family the format cannot hold; a dtype the format has not; peft without an adapter
    assert "--format gguf writes Llama-family" in refused(capsys, "export", "--checkpoint_dir", neox.checkpoint,
                                                         "--format", "gguf", "--out_dir", out)
    assert "q8_0" in refused(capsys, "export", "--checkpoint_dir", llama.checkpoint, "--format", "hf", "--dtype",
                             "q8_0", "--out_dir", out)
    assert "--adapter_path" in refused(capsys, "export", "--checkpoint_dir", llama.checkpoint, "--format", "peft",
                                       "--out_dir", out)
    assert "--max_shard_size" in refused(capsys, "export", "--checkpoint_dir", llama.checkpoint, "--format", "hf",
                                         "--max_shard_size", "lots", "--out_dir", out)
    assert not out.exists()

    # an existing non-empty --out_dir: refused, untouched; --overwrite does not delete a user's files either
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "other-model").mkdir()
    (out / "other-model" / "weights.bin").write_bytes(b"theirs")
    peft_args = ["export", "--checkpoint_dir", llama.checkpoint, "--format", "peft", "--adapter_path", llama.run]
    assert "--overwrite" in refused(capsys, *peft_args, "--out_dir", out)
    for command in (peft_args, ["merge", "--checkpoint_dir", llama.checkpoint, "--adapter_path", llama.run]):
        line = refused(capsys, *command, "--out_dir", out, "--overwrite", "true")
        assert "keep.txt, other-model" in line and "no littune export or merge wrote" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "other-model"]
    assert (out / "other-model" / "weights.bin").read_bytes() == b"theirs"
    # a folder littune wrote is replaced with --overwrite; once a user's file is added to it, it is refused
    ours = tmp_path / "ours"
    assert main([*map(str, peft_args), "--out_dir", str(ours)]) == 0
    assert json.loads((ours / "littune_export.json").read_text())["files"] == sorted(
        p.name for p in ours.iterdir() if p.name != "littune_export.json")
    # a failure half-way through writing leaves the old folder as it was and no temporary folder
    import littune.export.hf

    before = {p.name: p.read_bytes() for p in ours.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(littune.export.hf, "write_safetensors", broken)  # every format's safetensors writer
    with pytest.raises(OSError):
        main([*map(str, peft_args), "--out_dir", str(ours), "--overwrite", "true"])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in ours.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-only", "ours", "out", "v2"]
    assert main([*map(str, peft_args), "--out_dir", str(ours), "--overwrite", "true"]) == 0
    (ours / "notes.md").write_text("mine")
    assert "notes.md" in refused(capsys, *peft_args, "--out_dir", ours, "--overwrite", "true")
    assert (ours / "notes.md").read_text() == "mine" and (ours / "adapter_config.json").is_file()
    # the input folder itself is never an output
    assert "holds the input" in refused(capsys, "export", "--checkpoint_dir", llama.checkpoint, "--format", "hf",
                                        "--out_dir", llama.checkpoint, "--overwrite", "true")
