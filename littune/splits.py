"""Which prepared records go to which split: the sizes of the test and validation hold-outs, the records kept (a
record with nothing left to learn is dropped), and the seeded order of each split."""

from pathlib import Path
from typing import Optional

import torch

from littune.common import UserError

VAL_FRACTION, VAL_MAX = 0.05, 500  # the default validation split: 5% of the training records, at most 500


def check_split_arguments(test_size: Optional[int], test_file: Optional[Path]) -> None:
    """The combination of flags (each flag's own range is declared with it)."""
    if test_file is not None and test_size is not None:
        raise UserError("--test_size and --test_file exclude each other: the test file is the whole test split")


def split_sizes(
    n: int, test_split_fraction: float, test_size: Optional[int], val_size: Optional[int],
    test_file: Optional[Path], data_file: Path,
) -> tuple[int, int]:
    """(test, validation) records held out of the n usable records of the training file; training keeps >= 1.

    A random hold-out keeps at least one test record; the default validation split takes 5% of what the test split
    leaves (at least 1, at most 500) while at least one training record remains.
    """
    if test_file is not None:
        n_test = 0
    elif test_size is not None:
        if test_size >= n:
            raise UserError(f"{data_file}: --test_size {test_size} holds out {test_size} of {n} usable records, "
                            f"leaving none to train on; lower it")
        n_test = test_size
    else:
        if n < 2:
            raise UserError(f"{data_file}: {n} usable record; a random train/test split needs at least 2 "
                            f"(or give the test split with --test_file)")
        n_test = min(max(1, round(n * test_split_fraction)), n - 1)
    left = n - n_test
    if val_size is None:
        return n_test, min(VAL_MAX, max(1, round(left * VAL_FRACTION)), left - 1)
    if val_size >= left:
        raise UserError(f"{data_file}: --val_size {val_size} holds out {val_size} of the {left} usable training "
                        f"records, leaving none to train on; lower it (0: no validation split)")
    return n_test, val_size


def kept_records(full_ids: list, masked: list[int], ignore_index: int, n_train_read: int, read: list[tuple],
                 max_seq_length: int) -> tuple[list[int], list[int]]:
    """(the training records kept, the test records kept), by index: a record whose labels would all be ignored
    (its prompt filled the window) has nothing to learn and is dropped. read: (file, records read from it), the
    training file first; a file with none kept is refused."""
    usable = [not all(t == ignore_index for t in full_ids[i][masked[i]:]) for i in range(len(full_ids))]
    kept_train = [i for i in range(n_train_read) if usable[i]]
    kept_test = [i for i in range(n_train_read, len(full_ids)) if usable[i]]
    for (file, n), kept in zip(read, (kept_train, kept_test)):
        if n and not kept:
            raise UserError(
                f"{file}: all {n} records dropped: with --mask_inputs the prompt fills all "
                f"--max_seq_length {max_seq_length} tokens, leaving no response to learn; raise --max_seq_length"
            )
    return kept_train, kept_test


def split_orders(kept_train: list[int], kept_test: list[int], n_test: int, n_val: int, seed: int,
                 test_file: Optional[Path]) -> dict[str, list[int]]:
    """train, val and test: the records of each, by index, in their order. The training records are shuffled by the
    seed; an official test file keeps its own order, a random hold-out takes the first n_test shuffled records."""
    permutation = torch.randperm(len(kept_train), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [kept_train[j] for j in permutation]
    return {"train": shuffled[n_test + n_val :], "val": shuffled[n_test : n_test + n_val],
            "test": kept_test if test_file is not None else shuffled[:n_test]}
