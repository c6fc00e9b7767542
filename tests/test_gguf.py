"""GGUF import: `littune convert` on a folder holding a .gguf file, and `littune download --gguf_file`.

Tiny GGUF files are written here with `gguf.GGUFWriter` in the layout llama.cpp's converter gives them: its tensor
names, Q and K rows permuted for its RoPE, norms in F32, the 2-D weights in the type under test (quantized with
`gguf.quants.quantize`; K-quants, which that package only dequantizes, as random blocks with sane scales), the
tokenizer in the metadata (a small byte-level BPE trained here, special tokens as CONTROL) and a chat template.
The reference is transformers' own GGUF loading of the same file (and, for F32, the HF model the file was written
from): logits of littune's conversion run by litgpt's GPT must match within 1e-4. `download --gguf_file` runs in
subprocesses against the local Hub of tests/hub_server.py, started before the in-process tests.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (ALPACA_335, TOKENIZERS, listing, lit_logits, max_diff, one_error_line, run_cli,
                      run_main)
from hub_server import HubServer
from littune.cli import main

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2; bos = 1, eos = 2
TEXTS = [
    "Hello world, this is a test of the tokenizer: 1234 ünïcödé and\nnew lines.",
    "  leading spaces,\ttabs\tand   runs   of spaces  \n\n  x",
    "Numbers 3.14159 and 2024-01-02, it's we'll they've; émojis 🙂 and 中文.",
    "Say it<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nFour<|im_end|>\nok",
]
LLAMA_CPP_NAMES = {  # HF name (in a layer) -> llama.cpp's GGUF name
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
}
# where the float16 scales sit in a block of each K-quant (the rest of a random block is fine as it is)
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


# ------------------------------------------------------------------------------------------ writing GGUF files


def train_bpe(pre: str = "smollm", vocab_size: int = 700):
    """A byte-level BPE trained on the Alpaca records, with the pre-tokenizer of a llama.cpp `pre` type."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from littune.checkpoints.gguf_tokenizer import PRE_TOKENIZERS

    regex, digits = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated")] if regex else []
    steps += [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)]
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [" ".join(str(v) for v in r.values()) for r in json.loads(ALPACA_335.read_text())] + TEXTS
    tokenizer.train_from_iterator(texts, trainer)
    if pre == "llama-bpe":  # Llama 3's tokenizer.json ignores merges for words that are tokens
        state = json.loads(tokenizer.to_str())
        state["model"]["ignore_merges"] = True
        tokenizer = Tokenizer.from_str(json.dumps(state))
    return tokenizer


def bpe_metadata(tokenizer) -> tuple[list, list, list]:
    """tokens (by id), token types and merges ("a b") as llama.cpp's converter writes them."""
    state = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    kinds = [gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return tokens, kinds, merges


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: HF's rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(w: np.ndarray, qtype, rng) -> tuple[np.ndarray, object]:
    """(data, raw_dtype) for GGUFWriter.add_tensor: the tensor in `qtype` (random blocks for the K-quants)."""
    if qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return gguf.quants.quantize(w, Q.F16), None
    if qtype in K_QUANT_SCALES:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block_size, type_size), dtype=np.uint8)
        for offset in K_QUANT_SCALES[qtype]:
            scale = rng.uniform(1e-5, 5e-5, size=blocks.shape[:2]).astype(np.float16)
            blocks[..., offset:offset + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
        return blocks.reshape(w.shape[0], -1), qtype
    return gguf.quants.quantize(w, qtype), qtype


def write_gguf(path: Path, model, tokenizer, qtype=Q.F32, arch: str = "llama", pre: str = "smollm",
               extra_tensors: dict = (), seed: int = 0, metadata: dict = ()) -> Path:
    """`model` (a transformers Llama/Qwen2) as llama.cpp writes it, with `tokenizer` in the metadata (and the
    string fields `metadata`, e.g. general.license)."""
    c = model.config
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(path.stem)
    for key, value in dict(metadata).items():
        writer.add_string(key, value)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "llama":
        writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        writer.add_vocab_size(c.vocab_size)
    tokens, kinds, merges = bpe_metadata(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        for hf_suffix, gguf_suffix in LLAMA_CPP_NAMES.items():
            w = state.get(f"model.layers.{i}.{hf_suffix}")
            if w is None:
                continue
            if arch == "llama" and hf_suffix == "self_attn.q_proj.weight":
                w = llamacpp_permute(w, c.num_attention_heads)
            if arch == "llama" and hf_suffix == "self_attn.k_proj.weight":
                w = llamacpp_permute(w, c.num_key_value_heads)
            tensors[f"blk.{i}.{gguf_suffix}"] = w
    tensors["output_norm.weight"] = state["model.norm.weight"]
    if not c.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    tensors.update(dict(extra_tensors))
    for name, w in tensors.items():
        if isinstance(w, tuple):  # (raw bytes, type) given as they are
            writer.add_tensor(name, w[0], raw_dtype=w[1])
            continue
        data, raw_dtype = encode_tensor(w, qtype if w.ndim == 2 else Q.F32, rng)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model(arch: str = "llama", tied: bool = True, seed: int = 0, vocab_size: int = 700):
    """Sizes that every block size divides (256 for the K-quants); norms away from 1 so that a swap would show."""
    import transformers

    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                 tie_word_embeddings=tied)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes, use_sliding_window=False))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


# ------------------------------------------------------------------------------------------------ comparisons




def transformers_gguf_logits(folder: Path, gguf_name: str, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_name, dtype=torch.float32)
    with torch.inference_mode():
        return model.eval()(ids).logits




def random_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))








# -------------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bpe():
    return train_bpe("smollm")


@pytest.fixture(scope="module")
def llama(bpe):
    """The tied Llama (like SmolLM2) the quantized files are written from, and an untied one."""
    return {"tied": tiny_model(tied=True, vocab_size=bpe.get_vocab_size()),
            "untied": tiny_model(tied=False, seed=1, vocab_size=bpe.get_vocab_size())}


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory, llama, bpe):
    """`littune download --gguf_file` against a local Hub, started at once; `hub_runs[name].result()` waits."""
    src = tmp_path_factory.mktemp("gguf-repo")
    write_gguf(src / "tiny.Q8_0.gguf", llama["tied"], bpe, Q.Q8_0)
    write_gguf(src / "tiny.Q4_K.gguf", llama["tied"], bpe, Q.Q4_K)
    (src / "README.md").write_text("tiny GGUF files\n")
    base = tmp_path_factory.mktemp("gguf-runs")
    server = HubServer().start()
    for repo in ("org/tiny-GGUF", "org/tiny-GGUF-2", "org/tiny-GGUF-3"):
        server.add_folder(repo, src)

    def run(name, repo, *args):
        checkpoints, hf_home = base / name / "checkpoints", base / name / "hf_home"
        env = {"HF_ENDPOINT": server.url, "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1",
               "HF_HUB_ETAG_TIMEOUT": "60", "HF_HUB_DOWNLOAD_TIMEOUT": "60", "HF_HUB_OFFLINE": "0"}
        before = len(server.requests_for(repo))
        result = run_cli("download", "--repo_id", repo, "--checkpoint_dir", str(checkpoints), *args, env=env,
                         timeout=300)
        requests = server.requests_for(repo)[before:]
        result.gets = [r.path.rsplit("/", 1)[-1] for r in requests if r.method == "GET" and "/resolve/" in r.path]
        result.folder = checkpoints / repo
        return result

    def download_twice():
        first = run("ok", "org/tiny-GGUF", "--gguf_file", "tiny.Q8_0.gguf")
        return types.SimpleNamespace(first=first, again=run("ok", "org/tiny-GGUF", "--gguf_file", "tiny.Q8_0.gguf"))

    jobs = {
        "ok": download_twice,
        "no_gguf_file": lambda: run("no_gguf_file", "org/tiny-GGUF-2"),
        "missing": lambda: run("missing", "org/tiny-GGUF-3", "--gguf_file", "tiny.Q5_K_M.gguf"),
    }
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    yield types.SimpleNamespace(futures=futures, src=src)
    pool.shutdown(wait=True, cancel_futures=True)
    server.stop()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, llama, bpe, hub_runs):  # hub_runs: the downloads start first and run meanwhile
    """Per type: a folder holding `tiny.TYPE.gguf`, converted by the CLI."""
    root = tmp_path_factory.mktemp("gguf")
    folders = {}
    for qtype in TYPES:
        folder = root / f"tiny-{qtype.name}"
        folder.mkdir()
        write_gguf(folder / f"tiny.{qtype.name}.gguf", llama["tied"], bpe, qtype)
        assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
        folders[qtype] = folder
    return folders


# ----------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("qtype", TYPES, ids=[t.name for t in TYPES])
def test_logits_match_transformers_gguf_loading(converted, llama, qtype):
    folder = converted[qtype]
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    ids = random_ids(llama["tied"].config.vocab_size)
    got = lit_logits(folder, ids)
    assert got.dtype == torch.float32
    diff = max_diff(got, transformers_gguf_logits(folder, f"tiny.{qtype.name}.gguf", ids))
    assert diff <= 1e-4, f"{qtype.name}: max |logits diff| {diff:.2e}"
    if qtype == Q.F32:  # and the model the file was written from: the Q/K un-permutation is right
        with torch.inference_mode():
            assert max_diff(got, llama["tied"](ids).logits) <= 1e-4


def test_tied_embeddings(converted):
    folder = converted[Q.Q8_0]
    names = {t.name for t in gguf.GGUFReader(folder / "tiny.Q8_0.gguf").tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    state = torch.load(folder / "lit_model.pth", weights_only=True)
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])


def test_untied_f16_with_model_name_and_dtype(tmp_path, llama, bpe):
    """output.weight present: its own lm_head. --dtype bfloat16 and the F16 weights reach litgpt as they were."""
    folder = tmp_path / "untied"
    folder.mkdir()
    write_gguf(folder / "untied.F16.gguf", llama["untied"], bpe, Q.F16)
    assert main(["convert", "--checkpoint_dir", str(folder), "--dtype", "bfloat16"]) == 0
    state = torch.load(folder / "lit_model.pth", weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    expected = llama["untied"].lm_head.weight.detach().half().to(torch.bfloat16)
    assert torch.equal(state["lm_head.weight"], expected)


def test_folder_with_hf_weights_and_gguf(tmp_path, llama, bpe):
    """HF weights + a .gguf: the HF weights are converted, unless --gguf_file picks the GGUF file."""
    folder = tmp_path / "both"
    llama["untied"].save_pretrained(folder)
    bpe.save(str(folder / "tokenizer.json"))
    write_gguf(folder / "other.F32.gguf", tiny_model(tied=False, seed=2, vocab_size=bpe.get_vocab_size()), bpe)
    ids = random_ids(bpe.get_vocab_size())
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    with torch.inference_mode():
        assert max_diff(lit_logits(folder, ids), llama["untied"](ids).logits) <= 1e-4
    assert not (folder / "tokenizer_config.json").exists()  # the HF folder's tokenizer files are left alone
    assert main(["convert", "--checkpoint_dir", str(folder), "--gguf_file", "other.F32.gguf"]) == 0
    assert max_diff(lit_logits(folder, ids), transformers_gguf_logits(folder, "other.F32.gguf", ids)) <= 1e-4


def test_qwen2(tmp_path, bpe):
    """Qwen2: not permuted by llama.cpp, q/k/v biases."""
    model = tiny_model("qwen2", vocab_size=bpe.get_vocab_size())
    folder = tmp_path / "tiny-qwen2"
    folder.mkdir()
    write_gguf(folder / "qwen.F32.gguf", model, bpe, Q.F32, arch="qwen2", pre="qwen2")
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    ids = random_ids(model.config.vocab_size)
    got = lit_logits(folder, ids)
    with torch.inference_mode():
        assert max_diff(got, model(ids).logits) <= 1e-4
    assert max_diff(got, transformers_gguf_logits(folder, "qwen.F32.gguf", ids)) <= 1e-4


def test_tokenizer_matches_source_and_transformers(converted, bpe):
    """litgpt's Tokenizer on the converted folder gives the source tokenizer's ids and transformers' GGUF
    tokenizer's, special tokens included (each one id)."""
    import transformers
    from litgpt import Tokenizer

    folder = converted[Q.Q8_0]
    ours = Tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="tiny.Q8_0.gguf")
    assert not ours.use_bos and (ours.bos_id, ours.eos_id) == (1, 2)
    for text in TEXTS:
        ids = ours.encode(text).tolist()
        assert ids == bpe.encode(text).ids, text
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        if "<|" not in text:  # decoding leaves special tokens out
            assert ours.decode(torch.tensor(ids)) == text
    assert ours.processor.encode("<|im_start|><|endoftext|><|im_end|>").ids == [1, 0, 2]
    # transformers reading the converted folder itself (tokenizer.json + tokenizer_config.json) renders the chat
    # template taken from the GGUF metadata
    files = transformers.AutoTokenizer.from_pretrained(str(folder))
    chat = files.apply_chat_template([{"role": "user", "content": "Hi 42!"}], tokenize=False,
                                     add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi 42!<|im_end|>\n<|im_start|>assistant\n"
    ids = ours.encode(chat, bos=True).tolist()  # it starts with <|im_start|>, the BOS token
    assert ids == bpe.encode(chat).ids == theirs(chat, add_special_tokens=False)["input_ids"]
    assert ids == files(chat, add_special_tokens=False)["input_ids"]
    assert ids.count(1) == 2 and ids.count(2) == 1


def test_tokenizer_config_from_metadata(converted):
    folder = converted[Q.Q4_0]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert json.loads((folder / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_llama3_pre_tokenizer_matches_source():
    """tokenizer.ggml.pre "llama-bpe": Llama 3's split regex (digits in threes) and ignore_merges."""
    from littune.checkpoints.gguf import build_tokenizer

    source = train_bpe("llama-bpe", vocab_size=900)
    tokens, kinds, merges = bpe_metadata(source)
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [int(k) for k in kinds],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    ours, config, _ = build_tokenizer(meta, "test")
    assert config["add_bos_token"] is True  # llama.cpp's default for Llama 3 when the metadata does not say
    for text in TEXTS + ["12345678 and 1,000,000", "don't STOP'LL \r\n\r\n tabs\t\t"]:
        assert ours.encode(text).ids == source.encode(text).ids, text


def test_sentencepiece_vocabulary_matches_sentencepiece(tmp_path):
    """tokenizer.ggml.model "llama" (Llama 2's tokenizer.model as llama.cpp stores it): the ids of SentencePiece
    itself, through litgpt's Tokenizer (BOS added, as add_bos_token says)."""
    import sentencepiece
    from litgpt import Tokenizer

    from littune.checkpoints.gguf import build_tokenizer
    from littune.common import save_json

    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZERS / "llama" / "tokenizer.model"))

    def kind(i):
        if sp.is_unknown(i):
            return gguf.TokenType.UNKNOWN
        if sp.is_control(i):
            return gguf.TokenType.CONTROL
        if sp.is_byte(i):
            return gguf.TokenType.BYTE
        return gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.NORMAL

    n = sp.get_piece_size()
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [int(kind(i)) for i in range(n)],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True}
    tokenizer, config, generation = build_tokenizer(meta, "test")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    save_json(config, tmp_path / "tokenizer_config.json")
    save_json(generation, tmp_path / "generation_config.json")
    ours = Tokenizer(tmp_path)
    # plain text: no leading space or runs of spaces, where SentencePiece and every tokenizers port differ
    for text in [TEXTS[0], "Numbers 3.14159 and 2024-01-02, it's we'll; émojis 🙂 and 中文 \u2028x.", "The end"]:
        ids = ours.encode(text).tolist()
        assert ids == [1] + sp.encode(text), text
        assert ours.decode(torch.tensor(ids[1:])) == text


# --------------------------------------------------------------------------------------------- bad input


def small_gguf(path: Path, bpe, arch: str = "llama", **kwargs) -> Path:
    return write_gguf(path, tiny_model(vocab_size=bpe.get_vocab_size()), bpe, arch=arch, **kwargs)


def test_unsupported_architecture(tmp_path, bpe, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    small_gguf(folder / "m.gguf", bpe, arch="gpt2")
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "'gpt2'", "llama", "m.gguf")
    assert listing(folder) == before


def test_unsupported_quantization_type(tmp_path, bpe, capsys):
    """Q8_1 (llama.cpp's intermediate type for dot products) has no dequantizer in the gguf package."""
    folder = tmp_path / "q8_1"
    folder.mkdir()
    model = tiny_model(vocab_size=bpe.get_vocab_size())
    rows = model.config.hidden_size
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((rows, rows // block_size * type_size), dtype=np.uint8)
    write_gguf(folder / "m.gguf", model, bpe, extra_tensors={"blk.0.attn_q.weight": (raw, Q.Q8_1)})
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "blk.0.attn_q.weight", "Q8_1")
    assert listing(folder) == before


def test_llama31_rope_frequencies_refused(tmp_path, bpe, capsys):
    """Llama 3.1-style rope scaling (llama.cpp stores only the resulting factors, rope_freqs.weight)."""
    folder = tmp_path / "rope"
    folder.mkdir()
    small_gguf(folder / "m.gguf", bpe, extra_tensors={"rope_freqs.weight": np.ones(32, dtype=np.float32)})
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "rope_freqs.weight", "m.gguf")
    assert listing(folder) == before


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_gguf(tmp_path, bpe, capsys, keep):
    """Cut in the tensor data, in its last bytes, and in the metadata."""
    folder = tmp_path / "cut"
    folder.mkdir()
    path = small_gguf(folder / "m.gguf", bpe)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "truncated", "m.gguf")
    assert listing(folder) == before


def test_several_gguf_files_need_gguf_file(tmp_path, bpe, capsys):
    folder = tmp_path / "two"
    folder.mkdir()
    small_gguf(folder / "a.gguf", bpe)
    shutil.copyfile(folder / "a.gguf", folder / "b.gguf")
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "a.gguf, b.gguf", "--gguf_file")
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder), "--gguf_file", "c.gguf"),
                   "c.gguf", "a.gguf, b.gguf")
    assert listing(folder) == before
    assert main(["convert", "--checkpoint_dir", str(folder), "--gguf_file", "b.gguf"]) == 0
    assert (folder / "lit_model.pth").is_file()


def test_gguf_package_missing(tmp_path, bpe, capsys, monkeypatch):
    from littune.checkpoints.gguf import GGUF_MISSING

    folder = tmp_path / "nogguf"
    folder.mkdir()
    small_gguf(folder / "m.gguf", bpe)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    before = listing(folder)
    line = one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), GGUF_MISSING)
    assert line == f"littune: error: {GGUF_MISSING}"
    assert listing(folder) == before


# -------------------------------------------------------------------------- crafted headers: bounded cost, one line
# GGUF files written byte by byte (docs/gguf.md of llama.cpp): what GGUFWriter would refuse to write, or would take
# long to, such as a million strings.


def packed(text) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv_string(key: str, value) -> bytes:
    return packed(key) + struct.pack("<I", 8) + packed(value)


def kv_u32(key: str, value: int) -> bytes:
    return packed(key) + struct.pack("<II", 4, value)


def kv_strings(key: str, values: list) -> bytes:
    return packed(key) + struct.pack("<IIQ", 9, 8, len(values)) + b"".join(map(packed, values))


def kv_numbers(key: str, kind: int, code: str, values: list) -> bytes:
    return packed(key) + struct.pack("<IIQ", 9, kind, len(values)) + struct.pack(f"<{len(values)}{code}", *values)


LLAMA_SIZES = [kv_string("general.architecture", "llama"), kv_u32("llama.embedding_length", 64),
               kv_u32("llama.block_count", 1), kv_u32("llama.feed_forward_length", 128),
               kv_u32("llama.attention.head_count", 4), kv_u32("llama.context_length", 64)]


def raw_gguf(path: Path, values: list, tensor_table: bytes = b"", n_tensors: int = 0, version: int = 3,
             n_values: int = None) -> Path:
    """A GGUF file from encoded metadata values (and, optionally, a tensor table and a lying count)."""
    counts = struct.pack("<IQQ", version, n_tensors, len(values) if n_values is None else n_values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + counts + b"".join(values) + tensor_table)
    return path


COST_SCRIPT = """
import json, sys, time
from pathlib import Path
import gguf, tokenizers  # imported first: the measure is of reading the file, not of imports
from littune.checkpoints.gguf import _read, build_tokenizer

def status_kb(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])

def measure(call):
    # the peak resident size of this call alone: Linux resets the process's peak (VmHWM) on "5" to clear_refs
    Path("/proc/self/clear_refs").write_text("5")
    rss, cpu = status_kb("VmRSS"), time.process_time()
    value = call()
    return value, {"cpu_s": time.process_time() - cpu, "rss_mb": (status_kb("VmHWM") - rss) / 1024}

path = Path(sys.argv[1])
(meta, tensors), read = measure(lambda: _read(gguf, path))
tokenizer, built = measure(lambda: build_tokenizer(meta, str(path))[0])
print(json.dumps({"read": read, "tokenizer": built, "tokens": len(meta["tokenizer.ggml.tokens"]),
                  "vocabulary": tokenizer.get_vocab_size()}))
"""


def test_million_empty_tokens_cost_little(tmp_path):
    """8 MB of metadata, a million empty token strings: gguf.GGUFReader took 1.64 GB and 17 s over it. Read in a
    fresh process (CPU time and peak resident memory of each step, Linux's /proc): the metadata in under a second
    and 200 MB, the tokenizer built from it (one distinct token) in a bounded time and memory too."""
    path = raw_gguf(tmp_path / "m" / "m.gguf", LLAMA_SIZES + [
        kv_string("tokenizer.ggml.model", "llama"),
        packed("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1_000_000) + struct.pack("<Q", 0) * 1_000_000])
    assert 8_000_000 < path.stat().st_size < 8_100_000
    result = subprocess.run([sys.executable, "-c", COST_SCRIPT, str(path)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    cost = json.loads(result.stdout.splitlines()[-1])
    assert cost["tokens"] == 1_000_000 and cost["vocabulary"] == 1
    assert cost["read"]["cpu_s"] < 1 and cost["read"]["rss_mb"] < 200, cost
    assert cost["tokenizer"]["cpu_s"] < 3 and cost["tokenizer"]["rss_mb"] < 200, cost


def test_header_reader_matches_gguf_package(converted):
    """littune's own header reader gives what gguf.GGUFReader gives: every kept key's value, every tensor."""
    from littune.checkpoints.gguf import _kept_key, _read, read_metadata

    path = converted[Q.Q4_K] / "tiny.Q4_K.gguf"
    meta, tensors = _read(gguf, path)
    reader = gguf.GGUFReader(path)
    assert meta == {k: v for k, v in read_metadata(reader).items() if _kept_key(k)}
    assert len(meta["tokenizer.ggml.tokens"]) > 500 and "tokenizer.chat_template" in meta
    assert {name: tuple(t[1:]) for name, t in tensors.items()} == {
        t.name: (t.tensor_type, tuple(int(n) for n in t.shape), int(t.n_bytes), int(t.data_offset))
        for t in reader.tensors}


def test_large_real_size_vocabulary_loads(tmp_path):
    """A vocabulary of 262,144 tokens (Gemma 3's size) with as many merges: no bound meant for crafted files refuses
    it, and the tokenizer is built from it."""
    from tokenizers import pre_tokenizers

    from littune.checkpoints.gguf import _read, build_tokenizer, hf_config

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    letters = sorted(alphabet)[:64]
    pairs = [a + b for a in letters for b in letters]
    triples = [p + c for p in pairs for c in letters]  # 262,144
    tokens = sorted(alphabet) + pairs + triples[:262_144 - len(alphabet) - len(pairs)]
    merges = [f"{t[0]} {t[1]}" for t in pairs] + [f"{t[:2]} {t[2]}" for t in tokens[len(alphabet) + len(pairs):]]
    path = raw_gguf(tmp_path / "m" / "big.gguf", LLAMA_SIZES + [
        kv_string("tokenizer.ggml.model", "gpt2"), kv_string("tokenizer.ggml.pre", "gpt2"),
        kv_strings("tokenizer.ggml.tokens", tokens), kv_numbers("tokenizer.ggml.token_type", 5, "i", [1] * len(tokens)),
        kv_strings("tokenizer.ggml.merges", merges)])
    assert len(tokens) == 262_144
    meta, tensors = _read(gguf, path)
    hf_config(meta, tensors, path)
    tokenizer = build_tokenizer(meta, str(path))[0]
    assert tokenizer.get_vocab_size() == 262_144
    first_triple = len(alphabet) + len(pairs)  # letters[0] three times: a pair merge, then a triple merge
    assert [t.id for t in tokenizer.model.tokenize(tokens[first_triple])] == [first_triple]


def test_long_sentencepiece_piece_refused():
    """One 100,000-character piece made the merge rebuild cut it 100,000 times: SentencePiece itself allows 512."""
    from littune.checkpoints.gguf import build_tokenizer
    from littune.common import UserError

    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": ["a", "b", "ab" * 50_000, "ab" * 256], "tokenizer.ggml.token_type": [1, 1, 1, 1]}
    with pytest.raises(UserError, match="100,000 characters.*512"):
        build_tokenizer(meta, "m.gguf")
    meta["tokenizer.ggml.tokens"][2] = "ba"
    assert build_tokenizer(meta, "m.gguf")[0].get_vocab_size() == 4  # 512 characters are fine


BAD_VOCABULARIES = {  # metadata change -> words of the error
    "types_short": ({"tokenizer.ggml.token_type": [1]}, "token_type has 1 entries"),
    "scores_not_numbers": ({"tokenizer.ggml.scores": ["x", "y", "z"]}, "scores is not a list of numbers"),
    "tokens_not_strings": ({"tokenizer.ggml.tokens": [1, 2, 3]}, "tokens is not a list of strings"),
    "pre_not_string": ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": ["smollm"]}, "tokenizer.ggml.pre"),
    "template_not_string": ({"tokenizer.chat_template": 7}, "tokenizer.chat_template"),
    "merge_of_unknown_piece": ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["x y"]},
                               "does not make a tokenizer"),
    "too_many_control_tokens": ({"tokenizer.ggml.tokens": [f"<t{i}>" for i in range(20_001)],
                                 "tokenizer.ggml.token_type": [3] * 20_001}, "20,001 control"),
}


@pytest.mark.parametrize("case", BAD_VOCABULARIES)
def test_bad_tokenizer_metadata_is_one_error(case):
    """Tokenizer metadata of the wrong shape or kind: a UserError (one line), not an IndexError or TypeError."""
    from littune.checkpoints.gguf import build_tokenizer
    from littune.common import UserError

    change, words = BAD_VOCABULARIES[case]
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.token_type": [1, 1, 1], **change}
    with pytest.raises(UserError, match=re.escape(words)):
        build_tokenizer(meta, "m.gguf")


def tensor_entry(name: str, dims: list, kind: int = 0, offset: int = 0) -> bytes:
    return packed(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)


BAD_HEADERS = {  # file -> words of the error; each is read in a moment, whatever its counts claim
    "huge_value_count": (lambda p: raw_gguf(p, LLAMA_SIZES, n_values=1 << 60), "metadata count"),
    "huge_tensor_count": (lambda p: raw_gguf(p, LLAMA_SIZES, n_tensors=1 << 60), "tensor table"),
    "huge_string": (lambda p: raw_gguf(p, LLAMA_SIZES + [packed("k") + struct.pack("<IQ", 8, 1 << 60)]),
                    "past the end"),
    "huge_array": (lambda p: raw_gguf(p, LLAMA_SIZES + [packed("tokenizer.ggml.tokens")
                                                      + struct.pack("<IIQ", 9, 8, 1 << 60)]), "tokenizer.ggml.tokens"),
    "nested_arrays": (lambda p: raw_gguf(p, LLAMA_SIZES + [packed("x") + struct.pack("<I", 9) +
                                                          struct.pack("<IQ", 9, 1) * 50]), "nested"),
    "unknown_value_type": (lambda p: raw_gguf(p, LLAMA_SIZES + [packed("x") + struct.pack("<I", 77)]), "type 77"),
    "duplicate_key": (lambda p: raw_gguf(p, LLAMA_SIZES + LLAMA_SIZES[-1:]), "twice"),
    "big_endian": (lambda p: p.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0)), "big-endian"),
    "version_1": (lambda p: raw_gguf(p, LLAMA_SIZES, version=1), "version 1"),
    "five_dims": (lambda p: raw_gguf(p, LLAMA_SIZES, tensor_entry("token_embd.weight", [1] * 5), 1), "5 dimensions"),
    "unknown_tensor_type": (lambda p: raw_gguf(p, LLAMA_SIZES, tensor_entry("token_embd.weight", [64, 8], 99), 1),
                            "unknown type 99"),
    "zero_dim": (lambda p: raw_gguf(p, LLAMA_SIZES, tensor_entry("token_embd.weight", [64, 0]), 1), "shape [64, 0]"),
    "partial_block": (lambda p: raw_gguf(p, LLAMA_SIZES, tensor_entry("token_embd.weight", [48, 8], 8), 1),
                      "Q8_0 blocks of 32"),
    "bad_alignment": (lambda p: raw_gguf(p, LLAMA_SIZES + [kv_u32("general.alignment", 24)]), "power of two"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_crafted_header_is_one_error(tmp_path, capsys, case):
    folder = tmp_path / case
    folder.mkdir()
    make, words = BAD_HEADERS[case]
    make(folder / "m.gguf")
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "m.gguf", words)
    assert listing(folder) == before


@pytest.mark.parametrize("key, value, words", [
    ("llama.embedding_length", "wide", "not a positive number"),
    ("llama.attention.head_count", 0, "not a positive number"),
    ("split.count", "two", "split.count"),
    ("general.architecture", ["llama"], "architecture"),
])
def test_bad_model_metadata_is_one_error(tmp_path, capsys, key, value, words):
    """Sizes that are strings or zero (a ValueError or a division by zero before), an architecture that is a list
    (unhashable before)."""
    encode = {int: kv_u32, str: kv_string, list: kv_strings}[type(value)]
    values = [v for v in LLAMA_SIZES if not v.startswith(packed(key))]
    values += [encode(key, value), kv_string("tokenizer.ggml.model", "llama"),
               kv_strings("tokenizer.ggml.tokens", ["a"])]
    folder = tmp_path / "m"
    raw_gguf(folder / "m.gguf", values)
    before = listing(folder)
    one_error_line(run_main(capsys, "convert", "--checkpoint_dir", str(folder)), "m.gguf", words)
    assert listing(folder) == before


# ----------------------------------------------------------------------------------------- download --gguf_file


def test_download_gguf_file_fetches_only_it_and_converts(hub_runs, llama):
    job = hub_runs.futures["ok"].result()
    first = job.first
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr
    assert first.gets == ["tiny.Q8_0.gguf"]  # not the other GGUF, not the README
    folder = first.folder
    assert {"tiny.Q8_0.gguf", "lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in folder.iterdir()}
    ids = random_ids(llama["tied"].config.vocab_size)
    assert max_diff(lit_logits(folder, ids), transformers_gguf_logits(folder, "tiny.Q8_0.gguf", ids)) <= 1e-4
    again = job.again
    assert again.returncode == 0 and again.gets == [] and "skipping conversion" in again.stderr, again.stderr
    assert json.loads((folder / "origin.json").read_text()) == {"repo_id": "org/tiny-GGUF", "name": "tiny.Q8_0"}


def test_a_gguf_files_origin_reaches_the_cards_of_its_exports(tmp_path, bpe):
    """general.organization / license / source.repo_url of a GGUF file: recorded by convert, named by the card of an
    export of a folder that is not laid out as checkpoints/ORG/NAME (a URL of another host is not a repo id)."""
    from huggingface_hub import ModelCard

    cards = {}
    for source in ("https://huggingface.co/SomeOrg/Some-Model-1B", "https://example.com/SomeOrg/Some-Model-1B"):
        folder = tmp_path / f"my-model-{len(cards)}"
        folder.mkdir()
        small_gguf(folder / "m.gguf", bpe, metadata={"general.organization": "SomeOrg", "general.license": "mit",
                                                      "general.source.repo_url": source})
        assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
        out = tmp_path / f"hf-{len(cards)}"
        assert main(["export", "--checkpoint_dir", str(folder), "--format", "hf", "--out_dir", str(out)]) == 0
        cards[source] = ModelCard.load(out / "README.md").data
    on_hub, elsewhere = cards.values()
    assert on_hub.base_model == "SomeOrg/Some-Model-1B" and on_hub.license == "mit"
    assert elsewhere.base_model is None and elsewhere.license == "mit"


@pytest.mark.parametrize("name, fragments", [
    ("no_gguf_file", ["GGUF files", "--gguf_file", "tiny.Q4_K.gguf, tiny.Q8_0.gguf"]),
    ("missing", ["tiny.Q5_K_M.gguf", "tiny.Q4_K.gguf, tiny.Q8_0.gguf"]),
])
def test_download_gguf_errors(hub_runs, name, fragments):
    result = hub_runs.futures[name].result()
    line = one_error_line(result, *fragments)
    assert "org/tiny-GGUF-" in line
    assert result.gets == [] and not result.folder.exists()


def test_a_gguf_model_above_1b_parameters_converts_to_bfloat16_by_default():
    from littune.checkpoints.gguf import default_dtype
    from littune.checkpoints.gguf_header import TensorInfo

    def model(hidden, layers, vocab=32000):  # a Llama's tensors, ggml order; a 4-bit type: the rule is by count
        block = [TensorInfo(f"blk.{i}.{n}", Q.Q4_K, shape, 0, 0) for i in range(layers)
                 for n, shape in (("attn_q.weight", (hidden, hidden)), ("ffn_up.weight", (hidden, 8 * hidden // 3)))]
        return {t.name: t for t in [TensorInfo("token_embd.weight", Q.Q4_K, (hidden, vocab), 0, 0), *block]}

    assert default_dtype(model(576, 30)) == torch.float32  # SmolLM2-135M-sized
    assert default_dtype(model(4096, 32)) == torch.bfloat16  # Llama-2-7B-sized

