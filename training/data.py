"""Data: text / JSONL from a local path or S3, tokenized, packed into fixed-length sequences, sharded by rank.

Packing concatenates every document (each followed by EOS) into one token stream and cuts it into
`seq_len + 1`-token windows (inputs and shifted labels), so no compute is spent on padding.

Order is a pure function of (seed, epoch): each epoch is a seeded permutation of the packed sequences, and each
optimizer micro-step consumes the next `world_size * micro_batch_size` of them, rank r taking the r-th slice. The
loader's whole state is therefore two integers (epoch, position), the same on every rank; saving them in the
checkpoint makes a resumed run read exactly the batches the interrupted run would have read next.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}


class DataError(ValueError):
    """The data path is missing, unreadable or too small. The CLI reports it and exits non-zero."""


def list_data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"data path does not exist: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | JSONL_SUFFIXES)
    if not files:
        raise DataError(f"no .txt or .jsonl files under {path}")
    return files


def read_documents(files: list[Path], text_field: str) -> list[str]:
    docs: list[str] = []
    for f in files:
        if f.suffix in JSONL_SUFFIXES:
            for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{f}:{lineno}: expected an object with a string field {text_field!r}")
                docs.append(record[text_field])
        else:
            # Blank-line-separated paragraphs are documents: keeps tokenizer calls bounded on large files.
            docs.extend(p for p in f.read_text(encoding="utf-8").split("\n\n"))
    return [d for d in docs if d.strip()]


def pack(token_ids: list[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents (EOS after each) and cut into [n, seq_len + 1] windows; the tail is dropped."""
    stream: list[int] = []
    for ids in token_ids:
        stream.extend(ids)
        stream.append(eos_id)
    n = (len(stream) - 1) // seq_len
    if n == 0:
        return torch.empty(0, seq_len + 1, dtype=torch.long)
    flat = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
    # Windows overlap by one token: the last label of window i is the first input of window i+1.
    return flat.unfold(0, seq_len + 1, seq_len)


def build_sequences(path: Path, tokenizer: Any, seq_len: int, text_field: str) -> torch.Tensor:
    docs = read_documents(list_data_files(path), text_field)
    if not docs:
        raise DataError(f"dataset at {path} is empty: no non-blank text")
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    seqs = pack(ids, tokenizer.eos_token_id, seq_len)
    if len(seqs) == 0:
        total = sum(len(i) + 1 for i in ids)
        raise DataError(f"dataset at {path} has {total} tokens: fewer than one sequence of {seq_len + 1}")
    return seqs


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0
    """Index into this epoch's permutation of the next sequence to read (counted over all ranks)."""


class PackedLoader:
    """Deterministic, rank-sharded iterator of (input_ids, labels) micro-batches over packed sequences."""

    def __init__(self, sequences: torch.Tensor, micro_batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.sequences = sequences
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.global_micro_batch = micro_batch_size * world_size
        if len(sequences) < self.global_micro_batch:
            raise DataError(
                f"dataset has {len(sequences)} packed sequences, fewer than one global micro-batch "
                f"({micro_batch_size} per rank x {world_size} ranks): add data or lower data.seq_len"
            )
        self.state = LoaderState()
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.sequences), generator=g)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state.position + self.global_micro_batch > len(self.sequences):
            # Drop the epoch's ragged tail so that every rank always gets a full micro-batch.
            self.state = LoaderState(epoch=self.state.epoch + 1, position=0)
            self._perm = self._permutation(self.state.epoch)
        start = self.state.position + self.rank * self.micro_batch_size
        batch = self.sequences[self._perm[start : start + self.micro_batch_size]]
        self.state.position += self.global_micro_batch
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "position": self.state.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = LoaderState(epoch=int(state["epoch"]), position=int(state["position"]))
        self._perm = self._permutation(self.state.epoch)
