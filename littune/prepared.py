"""A prepared folder (written by `littune prepare`): its splits, its prepare.json, and the tokenizer its ids mean
(loaded, identified, and applied in batches by litgpt's rules, as prepare and scoring tokenise).

A record: instruction, input, output (str); input_ids, input_ids_no_response, labels (1-D int64 tensors).
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from littune.common import UserError, first_line, load_torch, sha256_file

PREPARED_FILES = ("train.pt", "test.pt", "prompt_style.yaml", "prepare.json")  # what every prepared folder has
SPLITS = ("train", "val", "test")
CHUNK_SIZE = 1024  # strings per tokenizer call: big enough to amortise the call, small enough for a live progress bar


def load_prepared(data_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """(train records, test records, prepare.json) of a folder written by `littune prepare`.

    A record: instruction, input, output (str); input_ids, input_ids_no_response, labels (1-D int64 tensors). The
    tensors of one file are views into one storage (fast to save and load): clone a record before saving it alone.
    The validation split, where there is one, is `load_split(data_dir, "val")`.
    """
    data_dir = Path(data_dir)
    for name in PREPARED_FILES:
        if not (data_dir / name).is_file():
            raise UserError(f"{data_dir}: no {name}; {_prepare_hint(data_dir)}")
    return load_split(data_dir, "train"), load_split(data_dir, "test"), load_prepare_json(data_dir)


def load_split(data_dir: Path, split: str) -> list[dict]:
    """The records of one split ("train", "val" or "test") of a prepared folder, in the format of `load_prepared`."""
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise UserError(f"split {split!r}: unknown; choose one of {', '.join(SPLITS)}")
    path = data_dir / f"{split}.pt"
    if not path.is_file():
        if split == "val" and (data_dir / "prepare.json").is_file():
            raise UserError(
                f"{data_dir}: no val.pt: prepared without a validation split (--val_size 0, too few records, or an "
                f"older littune); re-run littune prepare with --val_size > 0, or use the test split"
            )
        raise UserError(f"{data_dir}: no {split}.pt; {_prepare_hint(data_dir)}")
    try:
        records = load_torch(path, f"prepared {split} data")
    except UserError as e:
        raise UserError(f"{e}; re-run littune prepare") from e
    if not (isinstance(records, list) and records and isinstance(records[0], dict)
            and {"input_ids", "input_ids_no_response", "labels"} <= records[0].keys()):
        raise UserError(f"{path}: not a list of prepared records; re-run littune prepare")
    return records


def validation_split_name(data_dir: Path) -> str:
    """The split to select models on: "val" where the folder has val.pt, else "test" (folders of older littunes)."""
    return "val" if (Path(data_dir) / "val.pt").is_file() else "test"


def load_prepare_json(data_dir: Path) -> dict:
    meta_path = Path(data_dir) / "prepare.json"
    if not meta_path.is_file():
        raise UserError(f"{data_dir}: no prepare.json; {_prepare_hint(data_dir)}")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: not valid JSON ({e}); re-run littune prepare") from e


def _prepare_hint(data_dir: Path) -> str:
    return (f"prepare the data first: littune prepare --data_file FILE --checkpoint_dir DIR "
            f"--destination_path {data_dir}")


def tokenizer_identity(checkpoint_dir: Path) -> dict:
    """What makes token ids mean the same thing: compare it to prepare.json's "tokenizer" before training on the data.

    Keys: backend (huggingface or sentencepiece), file (the one litgpt loads), sha256 (of that file), vocab_size (ids
    the tokenizer can produce, added tokens included), bos_id, eos_id, use_bos.
    """
    checkpoint_dir = Path(checkpoint_dir)
    return tokenizer_identity_of(load_tokenizer(checkpoint_dir), checkpoint_dir)


def load_tokenizer(checkpoint_dir: Path):
    """litgpt's Tokenizer of the folder; a UserError when it has none or it cannot end a response (no EOS)."""
    from litgpt import Tokenizer

    if not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir}: no such checkpoint folder (littune download --repo_id ORG/NAME --tokenizer_only true)")
    if not any((checkpoint_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise UserError(
            f"{checkpoint_dir}: no tokenizer.json or tokenizer.model; get them with "
            f"littune download --repo_id ORG/NAME --tokenizer_only true"
        )
    try:
        tokenizer = Tokenizer(checkpoint_dir)
    except Exception as e:  # a corrupt tokenizer file, or a special token the vocabulary lacks
        raise UserError(f"{checkpoint_dir}: cannot load the tokenizer ({type(e).__name__}: {first_line(e)})") from e
    if tokenizer.eos_id is None:
        raise UserError(
            f"{checkpoint_dir}: the tokenizer has no end-of-sequence token (eos_token in tokenizer_config.json or "
            f"eos_token_id in generation_config.json); responses could not be ended"
        )
    if tokenizer.use_bos and tokenizer.bos_id is None:
        raise UserError(f"{checkpoint_dir}: tokenizer_config.json asks for a BOS token but defines none (bos_token)")
    return tokenizer


def tokenizer_identity_of(tokenizer, checkpoint_dir: Path) -> dict:
    # litgpt loads tokenizer.json when both files are there
    path = checkpoint_dir / ("tokenizer.json" if tokenizer.backend == "huggingface" else "tokenizer.model")
    if tokenizer.backend == "huggingface":
        vocab_size = tokenizer.processor.get_vocab_size(with_added_tokens=True)
    else:
        vocab_size = tokenizer.processor.vocab_size()
    return {
        "backend": tokenizer.backend,
        "file": path.name,
        "sha256": sha256_file(path),
        "vocab_size": vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "use_bos": bool(tokenizer.use_bos),
    }


def encode(tokenizer, text: str) -> "torch.Tensor":
    """One text's token ids as littune feeds every prompt to the model (`encode_batch`'s rule), int64."""
    import torch

    return torch.tensor(encode_batch(tokenizer, [text], progress=False)[0], dtype=torch.int64)


def encode_batch(tokenizer, texts: list[str], progress: bool = True) -> list[list[int]]:
    """The token ids of every text, in ordered batches: the text's own tokens (a special token the text writes, such
    as a chat template's <|im_start|>, included; nothing added by the tokenizer's post-processor), then BOS put
    first where the tokenizer uses one (litgpt's `use_bos`), as transformers' `apply_chat_template(tokenize=True)`
    tokenises a rendered conversation (add_special_tokens=False). litgpt's `Tokenizer.encode` differs in one way:
    it drops a leading BOS (and a trailing EOS) even where the text itself wrote it, which cut the first
    <|im_start|> of ChatML prompts whose BOS token is <|im_start|>.

    Two threads at most: the Hugging Face tokenizer releases the GIL inside a batch, so two Python threads run two
    batches at once whatever TOKENIZERS_PARALLELISM says; SentencePiece holds the GIL but threads a batch itself.
    """
    threads = min(2, os.cpu_count() or 1)
    chunks = [texts[i : i + CHUNK_SIZE] for i in range(0, len(texts), CHUNK_SIZE)]
    bos = [tokenizer.bos_id] if tokenizer.use_bos else []
    ids: list[list[int]] = []
    with tqdm(total=len(texts), desc="Tokenizing", unit=" texts", disable=None if progress else True,
              file=sys.stderr) as bar:
        for chunk_ids in _encode_chunks(tokenizer.processor, tokenizer.backend, chunks, threads):
            ids.extend(bos + t if bos and (not t or t[0] != bos[0]) else t for t in chunk_ids)
            bar.update(len(chunk_ids))
    return ids


def _encode_chunks(processor, backend: str, chunks: list[list[str]], threads: int) -> Iterator[list[list[int]]]:
    if backend == "huggingface":
        # special-token text in the string is still read as that token; no post-processor BOS/EOS, no offsets
        encode = getattr(processor, "encode_batch_fast", processor.encode_batch)
        with ThreadPoolExecutor(threads) as pool:
            yield from pool.map(lambda chunk: [e.ids for e in encode(chunk, add_special_tokens=False)], chunks)
    else:  # SentencePiece adds no BOS/EOS unless asked
        for chunk in chunks:
            yield processor.encode(chunk, num_threads=threads)


def with_eos(ids: list[int], tokenizer) -> list[int]:
    """A full text's ids ending in one EOS: the one training appends, or the text's own where it ends with the EOS
    text (a response that writes EOS itself gets no second one, as litgpt's prepare scripts build it)."""
    return ids if ids and ids[-1] == tokenizer.eos_id else ids + [tokenizer.eos_id]
