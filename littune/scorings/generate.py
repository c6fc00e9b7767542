"""--scoring generate: batched greedy answers (`littune.sampling.batched_greedy`: the tokens `littune generate
--temperature 0` gives one prompt at a time), compared with the expected outputs as text; for open-ended outputs."""

import torch

from littune.sampling import batched_greedy
from littune.scoring import results_with_loss
from littune.scorings import Scoring


def score(model, tokenizer, style, records: list, labels, ignore_index: int, batch_size: int, max_new_tokens: int,
          device) -> tuple[list[dict], float, int]:
    """(a row per record: prompt, prompt_ids, predicted: the greedy answer; the loss terms)."""
    requests = [{"prompt": style.apply(r["instruction"], input=r["input"]),
                 "context": r["input_ids_no_response"].tolist(), "continuations": []} for r in records]
    _, loss_sum, targets = results_with_loss(model, requests, records, ignore_index, batch_size, progress=True,
                                             desc="Test loss")
    generated = batched_greedy(model, [r["input_ids_no_response"] for r in records], max_new_tokens,
                               style.stop_tokens(tokenizer), batch_size, device, progress=True)
    return [{"prompt": request["prompt"], "prompt_ids": request["context"],
             "predicted": tokenizer.decode(torch.tensor(ids, dtype=torch.int64))}
            for request, ids in zip(requests, generated)], loss_sum, targets


SCORING = Scoring(
    name="generate",
    summary="greedy answers compared as text",
    needs_labels=False,
    score=score,
    generates=True,
)
