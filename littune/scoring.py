"""Label likelihood scoring, as lm-evaluation-harness scores a multiple-choice task: shared by `littune evaluate
--scoring likelihood` and the training loop's task metrics. Pure functions over a model, a tokenizer and prepared
records; no training code.

The rule (lm-evaluation-harness's loglikelihood requests):
- context ids: the record's prompt, tokenised as `littune prepare` tokenises it (the record's
  `input_ids_no_response`);
- a label's ids: the tokens of (prompt + label) after the first len(context ids) tokens, then EOS: prepare ends every
  training response with EOS, so a trained model says where its answer ends, and a label that is a prefix of another
  ("pos" / "positive") is decided by whether the answer ends there. Context ids + label ids is exactly the sequence
  scored, and the sequence prepare builds for a record with that answer. Where BPE merges the prompt's last token
  with the label (a prompt ending in a space), the context is cut back to the prompt ids every label's sequence
  starts with (`label_requests`): cut at len(prompt ids), such a label would have only EOS left to score;
- a label's score: the sum of the log-probabilities of its ids, each given the context and the ids before it;
- the prediction: the label with the highest score; ties go to the first label in the label order (the order of
  --labels, else sorted). `accuracy_norm` predicts by score / UTF-8 bytes of the label text (lm-evaluation-harness's
  acc_bytes), which does not favour short labels.
The text scored for a label is its spelling in the data (`label_texts`): "Positive" when the training answers say
"Positive", though the label set compares lowercased.

How it is computed, in `token_logprobs` (a record's context runs once, whatever the number of labels):
1. records are sorted by context length and cut into batches (--batch_size records, at most TOKENS_PER_FORWARD
   padded tokens);
2. the longest context prefix a batch's records share (a system prompt, the instruction) runs once, as one row, and
   its keys/values are copied into every row of the KV cache; the next batch with the same prefix reuses them;
3. the rest of each record's context, followed by one of its continuations (the longest), runs in one batched
   forward, right-padded, at the positions after the prefix; the vocabulary projection runs only where a
   log-probability is needed (the last context position, which scores every label's first token, the continuation,
   and the positions of loss targets when a test loss is asked for);
4. each other continuation with more than one token (a label's ids end with EOS) becomes a row whose KV cache is a
   copy of its record's, all rows of one length in one forward with per-row positions (with two one-token labels:
   one such row per record).
Measured on SmolLM2-135M (2-core CPU, float32): a forward over a few tokens per row costs about as much as reading
the weights and the copied caches, hence step 3 carries one continuation and step 4 runs once per batch. In
float32 the log-probabilities equal a plain forward over context + continuation to about 1e-5 (other kernels, other
rounding); under bf16 the logits themselves are rounded to bf16 first.
"""

import sys
from collections import Counter
from typing import Optional

import torch

from littune.common import UserError
from littune.metrics import normalize
from littune.model import final_norm_keeps, sequence_length, unwrap

TOKENS_PER_FORWARD = 4096  # caps B x T of a batch: where every position needs its logits they are B x T x vocab
CONTINUATION_ROWS = 256  # continuation rows per forward (each holds a copy of its record's KV cache)


# ------------------------------------------------------------------------------------------------- label requests


def label_texts(expected: list[str], labels: list[str]) -> list[str]:
    """The text to score for each label: its most frequent spelling among the expected outputs (the answers the
    model was trained on, whitespace included), else the label itself. Labels compare lowercased and trimmed."""
    spellings: dict[str, Counter] = {}
    for output in expected:
        spellings.setdefault(normalize(output), Counter())[output] += 1
    return [spellings[label].most_common(1)[0][0] if label in spellings else label for label in labels]


def label_requests(tokenizer, style, records: list[dict], texts: list[str], block_size: int) -> list[dict]:
    """Per record: {"prompt": the prompt text, "context": its ids, "continuations": each label's ids}.

    Tokenised with prepare's rule (`littune.prepared.encode_batch`), so the context is the record's
    `input_ids_no_response` (unless prepare cut that at --max_seq_length: then it is the whole prompt), and context +
    a label's ids is the sequence prepare builds for a record answering that label. Where BPE merges the prompt's
    last token with a label (a prompt ending in a space: "Sentiment: " + "positive" -> "Sentiment", ":",
    " positive"), the context is the part of the prompt's ids that every label's sequence starts with: splitting at
    len(prompt ids) would leave that label nothing but EOS to score. A context too long for block_size with its
    longest label loses its first tokens (as lm-evaluation-harness truncates).
    """
    from littune.prepared import encode_batch, with_eos

    prompts = [style.apply(r["instruction"], input=r["input"]) for r in records]
    full_texts = [prompt + text for prompt in prompts for text in texts]
    ids = encode_batch(tokenizer, prompts + full_texts)
    contexts, full = ids[:len(prompts)], ids[len(prompts):]
    requests = []
    for index, (prompt, context) in enumerate(zip(prompts, contexts)):
        rows = full[index * len(texts):(index + 1) * len(texts)]
        shared = common_prefix_length([context, *rows])
        if shared == 0:
            raise UserError(f"record {index}: its prompt and a label share no first token once tokenised; likelihood "
                            f"scoring needs a prompt to score the labels after")
        continuations = [with_eos(row, tokenizer)[shared:] for row in rows]
        room = block_size - max(len(c) for c in continuations) + 1  # the last label token is never an input
        if room < 1:
            raise UserError(f"a label of {max(map(len, continuations))} tokens does not fit the model's context of "
                            f"{block_size} tokens")
        requests.append({"prompt": prompt, "context": context[:shared][-room:], "continuations": continuations})
    return requests


def predict(logprobs: list[float], sizes: Optional[list[int]] = None) -> int:
    """The index of the highest score, scores divided by `sizes` when given; ties: the first (`max` keeps it)."""
    scores = logprobs if sizes is None else [lp / max(size, 1) for lp, size in zip(logprobs, sizes)]
    return max(range(len(scores)), key=scores.__getitem__)


def score_labels(model, tokenizer, style, records: list[dict], labels: list[str], texts: Optional[list[str]] = None,
                 batch_size: int = 16, progress: bool = False) -> list[dict]:
    """Likelihood predictions for the records, in their order: per record {"prompt", "prompt_ids", "predicted",
    "predicted_norm", "choices": {label: {"ids", "logprob"}}}. `texts`: the text scored per label (default
    `label_texts` of the records' outputs). predicted_norm: by logprob per UTF-8 byte of the text (accuracy_norm)."""
    texts = texts if texts is not None else label_texts([r["output"] for r in records], labels)
    requests = label_requests(tokenizer, style, records, texts, unwrap(model).config.block_size)
    results = token_logprobs(model, requests, batch_size, progress=progress)
    return [label_result(request, result, labels, texts) for request, result in zip(requests, results)]


def label_result(request: dict, result: dict, labels: list[str], texts: list[str]) -> dict:
    """One record's predictions from its label request and the log-probabilities of its continuations (the first
    len(labels) of them are the labels')."""
    logprobs = [sum(result["continuations"][i]) for i in range(len(labels))]
    sizes = [len(text.encode("utf-8")) for text in texts]
    return {
        "prompt": request["prompt"],
        "prompt_ids": request["context"],
        "predicted": labels[predict(logprobs)],
        "predicted_norm": labels[predict(logprobs, sizes)],
        "choices": {label: {"ids": request["continuations"][i], "logprob": logprobs[i]}
                    for i, label in enumerate(labels)},
    }


# ------------------------------------------------------------------------------------------------ the test loss


def with_loss(requests: list[dict], records: list[dict], ignore_index: int) -> tuple[list[dict], list[Optional[dict]]]:
    """Requests that also give each record's teacher-forced loss terms (its `labels` that are not ignore_index, as in
    training), and per record where they are: {"request": index, "continuation": index, "targets": its context target
    positions, "mask": which continuation tokens are targets}, or None (no target).

    Where the record's `input_ids` start with its request's context (the usual case), its response becomes one more
    continuation of that request (or is one already: the label it answers), and its targets inside the prompt (data
    prepared without --mask_inputs) become context targets: no second pass over the prompt. Otherwise (the
    tokenisation merged across the seam, or the context was cut) the record gets a request of its own.
    """
    requests = [dict(r, continuations=list(r["continuations"]), targets=list(r.get("targets", ())))
                for r in requests]
    plans: list[Optional[dict]] = []
    for index, record in enumerate(records):
        ids, labels = record["input_ids"].tolist(), record["labels"].tolist()
        context = requests[index]["context"]
        n = len(context)
        if n < len(ids) and ids[:n] == context:
            request = requests[index]
            request["targets"] = sorted(set(request["targets"]) | {t for t in range(1, n) if labels[t] != ignore_index})
            continuation = ids[n:]
            if continuation not in request["continuations"]:
                request["continuations"].append(continuation)
            plans.append({"request": index, "continuation": request["continuations"].index(continuation),
                          "targets": [t for t in range(1, n) if labels[t] != ignore_index],
                          "mask": [label != ignore_index for label in labels[n:]]})
            continue
        first = next((t for t in range(1, len(ids)) if labels[t] != ignore_index), None)
        if first is None:
            plans.append(None)
            continue
        requests.append({"context": ids[:first], "continuations": [ids[first:]], "targets": []})
        plans.append({"request": len(requests) - 1, "continuation": 0, "targets": [],
                      "mask": [label != ignore_index for label in labels[first:]]})
    return requests, plans


def loss_terms(requests: list[dict], results: list[dict], plans: list[Optional[dict]]) -> tuple[float, int]:
    """(sum of the target tokens' negative log-probabilities, number of target tokens) over all records."""
    total, count = 0.0, 0
    for plan in plans:
        if plan is None:
            continue
        request, result = requests[plan["request"]], results[plan["request"]]
        by_position = dict(zip(request["targets"], result["context"]))
        total -= sum(by_position[t] for t in plan["targets"])
        total -= sum(lp for lp, m in zip(result["continuations"][plan["continuation"]], plan["mask"]) if m)
        count += len(plan["targets"]) + sum(plan["mask"])
    return total, count


def results_with_loss(model, requests: list[dict], records: list[dict], ignore_index: int, batch_size: int = 16,
                      progress: bool = False, desc: str = "Scoring") -> tuple[list[dict], float, int]:
    """(the requests' continuation scores, the records' summed target-token loss, their number of target tokens)
    from one scoring pass: the loss targets ride along with the requests (`with_loss`)."""
    scored, plans = with_loss(requests, records, ignore_index)
    results = token_logprobs(model, scored, batch_size, progress=progress, desc=desc)
    loss_sum, targets = loss_terms(scored, results, plans)
    return results, loss_sum, targets


def labels_with_loss(model, tokenizer, style, records: list[dict], labels: list[str], ignore_index: int,
                     batch_size: int = 16, progress: bool = False) -> tuple[list[dict], float, int]:
    """The label-scoring pass of `littune evaluate --scoring likelihood` and of the training loop's task metrics:
    (a row per record as `score_labels` gives it, the summed target-token loss, the number of target tokens), the
    prompt of each record run once for both."""
    texts = label_texts([r["output"] for r in records], labels)
    requests = label_requests(tokenizer, style, records, texts, unwrap(model).config.block_size)
    results, loss_sum, targets = results_with_loss(model, requests, records, ignore_index, batch_size, progress,
                                                   "Scoring labels")
    # the records' own requests come first (zip stops there)
    return [label_result(request, result, labels, texts) for request, result in zip(requests, results)], loss_sum, \
        targets


# ---------------------------------------------------------------------------------------------- the model passes


@torch.no_grad()  # not inference_mode: the RoPE table rebuilt on leaving must stay usable by autograd
def token_logprobs(model, requests: list[dict], batch_size: int = 16, progress: bool = False, desc: str = "Scoring",
                   max_tokens: int = TOKENS_PER_FORWARD) -> list[dict]:
    """Per request {"context", "continuations", "targets" (optional)}: {"context": the log-probability of the context
    token at each target position t (given the tokens before it), "continuations": per continuation, the
    log-probability of each of its tokens given the context and its tokens before it}. See the module docstring."""
    from tqdm import tqdm

    device = next(unwrap(model).parameters()).device
    spans = [len(r["context"]) + max((len(c) - 1 for c in r["continuations"]), default=0) for r in requests]
    results: list[Optional[dict]] = [None] * len(requests)
    prefixes: dict = {}  # a shared prefix's tokens -> its keys/values and log-probabilities, computed once
    with sequence_length(model, max(spans)) as module, tqdm(total=len(requests), desc=desc, unit="rec",
                                                            file=sys.stderr, dynamic_ncols=True,
                                                            disable=not progress) as bar:
        for batch in length_batches([len(r["context"]) for r in requests], batch_size, max_tokens):
            # a continuation given twice is scored once: equal ids get equal log-probabilities, ties stay ties
            unique = [dict(requests[i], continuations=[list(ids) for ids in dict.fromkeys(
                map(tuple, requests[i]["continuations"]))]) for i in batch]
            for i, request, result in zip(batch, unique, _score_batch(module, unique, prefixes, device)):
                where = {tuple(ids): j for j, ids in enumerate(request["continuations"])}
                results[i] = {"context": result["context"],
                              "continuations": [list(result["continuations"][where[tuple(ids)]])
                                                for ids in requests[i]["continuations"]]}
            bar.update(len(batch))
    return results


def length_batches(lengths: list[int], batch_size: int, max_tokens: int = TOKENS_PER_FORWARD) -> list[list[int]]:
    """Indices by length, in batches of at most batch_size records and (unless one record is longer) max_tokens
    padded tokens, so that one forward's activations and logits stay a bounded size."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) == batch_size or (len(current) + 1) * lengths[i] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def common_prefix_length(rows: list[list[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return i
    return n


def _score_batch(module, requests: list[dict], prefixes: dict, device) -> list[dict]:
    contexts = [r["context"] for r in requests]
    targets = [r.get("targets", ()) for r in requests]
    lengths = [len(c) for c in contexts]
    rows = len(requests)
    # every row keeps at least its last context token out of the shared prefix: its logits score the first label token
    prefix = min(common_prefix_length(contexts), min(lengths) - 1)
    # each row's longest continuation extends its context in the context pass itself; the others get rows of their
    # own: a forward over a few tokens per row costs about as much as reading the weights and the copied caches
    folded = [max(range(len(r["continuations"])), key=lambda c: len(r["continuations"][c]), default=None)
              for r in requests]
    extension = [r["continuations"][f][:-1] if f is not None else [] for r, f in zip(requests, folded)]
    continuation_rows = [(row, c) for row, r in enumerate(requests) for c, ids in enumerate(r["continuations"])
                         if len(ids) > 1 and c != folded[row]]
    span = max(n + max((len(c) - 1 for c in r["continuations"]), default=0) for n, r in zip(lengths, requests))
    module.set_kv_cache(batch_size=max(rows, min(len(continuation_rows), CONTINUATION_ROWS)), max_seq_length=span,
                        device=device)
    caches = _caches(module, span)

    # 1. the shared prefix: computed once (as row 0) for all batches that share it, copied into every row's cache
    shared = None
    if prefix > 0:
        key = tuple(contexts[0][:prefix])
        if key not in prefixes:
            prefixes.clear()  # batches come by length, not by prefix: keep only the latest
            prefixes[key] = _prefix(module, caches, list(key), any(targets), device)
        shared = prefixes[key]
        for cache, (k, v) in zip(caches, shared["kv"]):
            cache.k[:rows, :, :prefix] = k
            cache.v[:rows, :, :prefix] = v

    # 2. the rest of every context and its folded continuation, batched and right-padded, at positions prefix, ...
    width = max(n + len(e) for n, e in zip(lengths, extension)) - prefix
    idx = torch.zeros((rows, width), dtype=torch.int64)
    gather_rows, gather_cols, gather_targets = [], [], []
    for row, (context, row_targets, ext) in enumerate(zip(contexts, targets, extension)):
        idx[row, :len(context) + len(ext) - prefix] = torch.tensor(context[prefix:] + ext)
        for t in row_targets:
            if t > prefix:
                gather_rows.append(row)
                gather_cols.append(t - 1 - prefix)
                gather_targets.append(context[t])
        n = len(context)
        gather_rows += [row] * len(ext)
        gather_cols += range(n - prefix, n - prefix + len(ext))
        gather_targets += requests[row]["continuations"][folded[row]][1:] if ext else []
    last = len(gather_rows)  # then the last context position of each row
    gather_rows += range(rows)
    gather_cols += [n - 1 - prefix for n in lengths]
    logits = _forward(module, idx.to(device), torch.arange(prefix, prefix + width, device=device), prefix + width,
                      gather_rows, gather_cols)[0]
    gathered = iter(_target_logprobs(logits[:last], gather_targets))
    first_lp = torch.log_softmax(logits[last:].float(), dim=-1)  # rows x vocab: each continuation's first token
    context_lp, continuation_lp = [], []
    for row, (context, row_targets, r) in enumerate(zip(contexts, targets, requests)):
        context_lp.append([(shared["tokens"][t - 1] if t < prefix else float(shared["last"][context[t]]))
                           if t <= prefix else next(gathered) for t in row_targets])
        continuation_lp.append([[float(first_lp[row, ids[0]])] for ids in r["continuations"]])
        if extension[row]:
            continuation_lp[row][folded[row]] += [next(gathered) for _ in extension[row]]

    # 3. the other continuations' other tokens: each a row with a copy of its record's KV cache
    if continuation_rows:
        saved = [(cache.k[:rows, :, :max(lengths)].clone(), cache.v[:rows, :, :max(lengths)].clone())
                 for cache in caches]
        for chunk in _same_length_chunks(continuation_rows, requests):
            for (row, c), lps in zip(chunk, _continuations(module, caches, requests, lengths, chunk, saved, span,
                                                           device)):
                continuation_lp[row][c] += lps
    return [{"context": context_lp[row], "continuations": continuation_lp[row]} for row in range(rows)]


def _prefix(module, caches: list, tokens: list[int], with_logprobs: bool, device) -> dict:
    """Run a shared prefix as row 0: its keys/values per layer (1 x groups x P x head size) and, when context
    targets need them, the log-probability of each prefix token given the ones before ("tokens", index t - 1) and
    the log-softmax after the whole prefix ("last": the next token differs per row)."""
    n = len(tokens)
    wanted = list(range(n)) if with_logprobs else []
    logits = _forward(module, torch.tensor([tokens], device=device), torch.arange(n, device=device), n,
                      [0] * len(wanted), wanted)[0]
    shared = {"kv": [(cache.k[:1, :, :n].clone(), cache.v[:1, :, :n].clone()) for cache in caches]}
    if with_logprobs:
        shared["tokens"] = _target_logprobs(logits[:-1], tokens[1:])
        shared["last"] = torch.log_softmax(logits[-1].float(), dim=-1)
    return shared


def _same_length_chunks(continuation_rows: list[tuple[int, int]], requests: list[dict]) -> list[list]:
    """The continuation rows grouped by length, at most CONTINUATION_ROWS a group: a padded row would write its pads'
    keys/values into cache slots that a real token of its own (a longer context) may need."""
    by_length: dict[int, list] = {}
    for row, c in continuation_rows:
        by_length.setdefault(len(requests[row]["continuations"][c]), []).append((row, c))
    return [group[i:i + CONTINUATION_ROWS] for _, group in sorted(by_length.items())
            for i in range(0, len(group), CONTINUATION_ROWS)]


def _continuations(module, caches: list, requests: list[dict], lengths: list[int], chunk: list[tuple[int, int]],
                   saved: list, span: int, device) -> list[list[float]]:
    """Log-probabilities of tokens 2.. of each continuation in `chunk` ((row, index) pairs of one length), one row
    each, at the positions after its record's context."""
    source = torch.tensor([row for row, _ in chunk], device=device)
    for cache, (k, v) in zip(caches, saved):
        cache.k[:len(chunk), :, :k.size(2)] = k.index_select(0, source)
        cache.v[:len(chunk), :, :v.size(2)] = v.index_select(0, source)
    inputs = [requests[row]["continuations"][c][:-1] for row, c in chunk]
    width = len(inputs[0])
    idx = torch.tensor(inputs, dtype=torch.int64, device=device)
    start = torch.tensor([lengths[row] for row, _ in chunk], device=device)
    positions = start[:, None] + torch.arange(width, device=device)
    targets = [t for row, c in chunk for t in requests[row]["continuations"][c][1:]]
    logits = _forward(module, idx, positions, span, [i for i in range(len(chunk)) for _ in range(width)],
                      list(range(width)) * len(chunk))[0]
    flat = _target_logprobs(logits, targets)
    return [flat[i * width:(i + 1) * width] for i in range(len(chunk))]


def _forward(module, idx: torch.Tensor, input_pos: torch.Tensor, input_pos_maxp1: int, rows: list[int],
             cols: list[int]) -> torch.Tensor:
    """The model's logits at the (row, column) pairs only, shape 1 x N x vocab (the vocabulary projection of the
    other positions is never computed)."""
    device = idx.device
    rows_t, cols_t = torch.tensor(rows, dtype=torch.int64, device=device), torch.tensor(cols, dtype=torch.int64,
                                                                                         device=device)
    with final_norm_keeps(module, lambda out: out[rows_t, cols_t][None]):  # the pairs only, as 1 x N x C
        return module(idx, input_pos, input_pos_maxp1=input_pos_maxp1)


def _target_logprobs(logits: torch.Tensor, targets: list[int]) -> list[float]:
    """log p(target) at each row of N x vocab logits, without an N x vocab log-softmax copy (cross_entropy fuses
    it), in float32."""
    if not targets:
        return []
    target = torch.tensor(targets, dtype=torch.int64, device=logits.device)
    return (-torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")).tolist()


def _caches(module, span: int) -> list:
    """The KV caches of the model's blocks (litgpt: block.attn.kv_cache, buffers k and v of shape
    batch x groups x length x head size), where slot = position: a sliding-window cache shorter than the sequences
    is a ring buffer, which the copies here do not handle."""
    caches = [block.attn.kv_cache for block in module.transformer.h]
    if any(cache.k.size(2) < span for cache in caches):
        raise UserError(f"likelihood scoring of {span}-token sequences needs a KV cache that long; this model's "
                        f"sliding-window attention keeps {min(cache.k.size(2) for cache in caches)}")
    return caches
