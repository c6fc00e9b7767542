"""The tokenizer of a GGUF file, rebuilt with the `tokenizers` library from its metadata (`tokenizer.ggml.*`).

Byte-level BPE (`tokenizer.ggml.model` "gpt2") with the pre-tokenizer named by `tokenizer.ggml.pre`, or
SentencePiece-style BPE ("llama"), plus the tokenizer_config.json (bos/eos, add_bos_token, chat_template) and
generation_config.json dicts. The metadata comes from someone else's file: every list is checked for its kind and
length first, and the two costs that grow faster than the file (special tokens, which the tokenizers library adds in
quadratic time, and the SentencePiece merge rebuild, quadratic in a piece's length) are bounded.
"""

from typing import Optional

from littune.common import UserError, first_line

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# the tokenizers library adds special and user-defined tokens in time quadratic in their number (40,000: 3 s);
# real vocabularies have a few hundred (Gemma's, with its unused slots, some thousands)
MAX_ADDED_TOKENS = 20_000
SPM_MAX_PIECE = 512  # SentencePiece's trainer limit on a piece's length (max_sentencepiece_length <= 512)

# tokenizer.ggml.pre -> how the original tokenizer.json split text before byte-level BPE: a regex applied first
# (None: GPT-2's, which the byte-level step applies itself) and whether digits are split one by one. The regexes are
# the ones of the models' tokenizer.json files, which llama.cpp's llama-vocab.cpp reimplements per pre type.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    # "default": files written before llama.cpp recorded the pre-tokenizer; GPT-2's is what transformers uses too
    "default": (None, False), "gpt2": (None, False), "gpt-2": (None, False), "mpt": (None, False),
    "olmo": (None, False),
    "smollm": (None, True), "starcoder": (None, True), "refact": (None, True),
    "llama-bpe": (_LLAMA3_REGEX, False), "llama3": (_LLAMA3_REGEX, False), "llama-v3": (_LLAMA3_REGEX, False),
    "dbrx": (_LLAMA3_REGEX, False), "smaug-bpe": (_LLAMA3_REGEX, False),
    "qwen2": (_QWEN2_REGEX, False), "stablelm2": (_QWEN2_REGEX, False),
}
# pre types whose tokenizer.json has `ignore_merges` (a word that is a token is not re-merged), as llama.cpp sets it
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}
# pre types whose BPE tokenizers add BOS when the metadata does not say (llama.cpp's defaults)
_ADD_BOS = {"llama-bpe", "llama3", "llama-v3"}


def build_tokenizer(meta: dict, where: str) -> tuple:
    """(tokenizers.Tokenizer, tokenizer_config.json dict, generation_config.json dict) from the GGUF metadata."""
    tokens, types, scores, merges = _vocabulary(meta, where)
    if types is None:  # a file without token types: at least bos/eos/unk must stay one token each
        types = [NORMAL] * len(tokens)
        for key in ("bos", "eos", "unknown"):
            i = token_id(meta, f"tokenizer.ggml.{key}_token_id", len(tokens))
            if i is not None:
                types[i] = CONTROL
    added = sum(1 for kind in types if kind in (CONTROL, UNKNOWN, USER_DEFINED))
    if added > MAX_ADDED_TOKENS:
        raise UserError(f"{where}: {added:,} control and user-defined tokens; littune converts at most "
                        f"{MAX_ADDED_TOKENS:,} (the tokenizers library adds them in time quadratic in their number)")
    model = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    template = meta.get("tokenizer.chat_template")
    if not isinstance(pre, str) or not isinstance(template, (str, type(None))):
        key = "tokenizer.ggml.pre" if not isinstance(pre, str) else "tokenizer.chat_template"
        raise UserError(f"{where}: {key} is a {type(meta[key]).__name__}, not a string")
    try:
        if model == "gpt2":
            tokenizer = _bpe_tokenizer(tokens, types, merges or [], pre, where)
            add_bos_default = pre in _ADD_BOS
        elif model == "llama":
            scores = scores or [0.0] * len(tokens)
            add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
            unk_id = token_id(meta, "tokenizer.ggml.unknown_token_id", len(tokens))
            tokenizer = _spm_tokenizer(tokens, types, scores, unk_id, add_prefix, where)
            add_bos_default = True
        else:
            raise UserError(
                f"{where}: tokenizer type {model!r} cannot be converted; littune builds gpt2 (byte-level BPE) and "
                f"llama (SentencePiece) tokenizers"
            )
    except UserError:
        raise
    except Exception as e:  # the tokenizers library's own checks, e.g. a merge of a piece the vocabulary lacks
        raise UserError(f"{where}: the GGUF vocabulary does not make a tokenizer ({first_line(e)})") from e

    def token(key: str) -> Optional[str]:
        i = token_id(meta, f"tokenizer.ggml.{key}", len(tokens))
        return None if i is None else tokens[i]

    config = {
        # "LlamaTokenizer" in the class name makes litgpt decode single SentencePiece tokens with their leading space
        "tokenizer_class": "LlamaTokenizerFast" if model == "llama" else "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    arch = meta.get("general.architecture")
    if isinstance(meta.get(f"{arch}.context_length"), int):
        config["model_max_length"] = meta[f"{arch}.context_length"]
    config = {k: v for k, v in config.items() if v is not None}
    generation = {
        f"{key}_token_id": meta[f"tokenizer.ggml.{gguf_key}_token_id"]
        for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
        if token_id(meta, f"tokenizer.ggml.{gguf_key}_token_id", len(tokens)) is not None
    }
    return tokenizer, config, generation


def _vocabulary(meta: dict, where: str) -> tuple:
    """(tokens, token types, scores, merges) from the metadata, each checked: lists of the right kind, one type and
    score per token. Types, scores and merges are None where the file has none."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{where}: the GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")

    def array(key: str, kinds: tuple, what: str, length: Optional[int] = None) -> Optional[list]:
        value = meta.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, kinds) for v in value):
            raise UserError(f"{where}: {key} is not a list of {what}")
        if length is not None and len(value) != length:
            raise UserError(f"{where}: {key} has {len(value):,} entries for {length:,} tokens")
        return value

    array("tokenizer.ggml.tokens", (str,), "strings")
    types = array("tokenizer.ggml.token_type", (int,), "integers", len(tokens))
    scores = array("tokenizer.ggml.scores", (float, int), "numbers", len(tokens))
    return tokens, types, scores, array("tokenizer.ggml.merges", (str,), "strings")


def token_id(meta: dict, key: str, n_tokens: int) -> Optional[int]:
    """The token id under `key` if it is one (an int naming a token of the vocabulary), else None."""
    i = meta.get(key)
    return i if type(i) is int and 0 <= i < n_tokens else None


def _bpe_tokenizer(tokens: list, types: list, merges: list, pre: str, where: str):
    """A byte-level BPE tokenizer.json like the model's original one (GPT-2, Llama 3, SmolLM, Qwen2 families)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    if pre not in PRE_TOKENIZERS:
        raise UserError(
            f"{where}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) cannot be converted; littune knows "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    if not merges:
        raise UserError(f"{where}: a gpt2 (BPE) tokenizer without merges (tokenizer.ggml.merges)")
    regex, individual_digits = PRE_TOKENIZERS[pre]
    vocab = _vocab(tokens)
    pairs = []
    for merge in merges:
        split = merge.find(" ", 1)  # as llama.cpp: a piece may itself start with a space
        if split < 0:
            raise UserError(f"{where}: malformed merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((merge[:split], merge[split + 1:]))
    tokenizer = Tokenizer(BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    steps = []
    if individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is not None:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=regex is None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    _add_tokens(tokenizer, tokens, types)
    return tokenizer


def _spm_tokenizer(tokens: list, types: list, scores: list, unk_id: Optional[int], add_prefix: bool,
                   where: str = "the GGUF metadata"):
    """A SentencePiece-style BPE (Llama 2, Mistral): merges ranked by the merged piece's score, byte fallback.

    As transformers' LlamaConverter builds it from tokenizer.model, in its "legacy" form, which is llama.cpp's
    behaviour: a "▁" is prepended to the text and after every special token. The merges are found by cutting each
    piece in two, so a piece of L characters costs L cuts of up to L characters: pieces longer than SentencePiece's
    own limit are refused, and no cut leaves a side longer than the longest piece (such a side cannot be one).
    """
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    vocab = _vocab(tokens)
    mergeable = {t for t, kind in zip(tokens, types) if kind == NORMAL}
    longest = max(map(len, mergeable), default=0)
    if longest > SPM_MAX_PIECE:
        piece = next(t for t in mergeable if len(t) == longest)
        raise UserError(f"{where}: token {piece[:20]!r}... is {longest:,} characters long; a SentencePiece piece has "
                        f"at most {SPM_MAX_PIECE}")
    candidates = []
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(max(1, len(piece) - longest), min(len(piece), longest + 1)):
            left = piece[:cut]
            if left in mergeable:
                right = piece[cut:]
                if right in mergeable:
                    candidates.append((-scores[i], i, vocab[left], vocab[right], left, right))
    merges = [(c[4], c[5]) for c in sorted(candidates)]
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    replace = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if add_prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * bool(add_prefix))
    _add_tokens(tokenizer, tokens, types)
    return tokenizer


def _vocab(tokens: list) -> dict:
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id
    return vocab


def _add_tokens(tokenizer, tokens: list, types: list) -> None:
    """Control tokens (<|im_start|>, <s>) become special added tokens, user-defined ones plain added tokens, so
    that each is matched in the text as one id, before the pre-tokenizer could split it."""
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)
