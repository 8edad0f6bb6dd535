"""Data: text / JSONL from a local path or S3, tokenized, packed into fixed-length sequences, sharded by rank.

Packing concatenates every document (each followed by the model's document separator) into one token stream and
cuts it into `seq_len + 1`-token windows (inputs and shifted labels), so no compute is spent on padding.

Two kinds of document:
- plain text (a .txt paragraph or a JSONL `{"text": ...}`): every token is trained on. The separator is EOS for a
  base model; for an instruct model whose EOS ends a chat turn (SmolLM2 and Qwen's `<|im_end|>`, Llama 3's
  `<|eot_id|>`), it is the pre-training end-of-text token instead (`document_separator`), because training on
  "end of turn" after every paragraph teaches the model to stop its answers mid-way;
- a chat (a JSONL `{"messages": [{"role": ..., "content": ...}, ...]}`): rendered with the tokenizer's own chat
  template, and only the assistant turns (including their end-of-turn token, which is what teaches the model to
  stop) carry loss; system and user tokens are context. Windows with no assistant token are dropped.

Order is a pure function of (seed, epoch): each epoch is a seeded permutation of the packed sequences, and each
optimizer micro-step consumes the next `world_size * micro_batch_size` of them, rank r taking the r-th slice. The
loader's whole state is therefore two integers (epoch, position), the same on every rank; saving them in the
checkpoint makes a resumed run read exactly the batches the interrupted run would have read next.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TEXT_SUFFIXES = {".txt", ".text", ".md"}
IGNORE_INDEX = -100
"""Label of tokens that carry no loss (torch.nn.functional.cross_entropy's default ignore_index)."""
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


Document = str | list[dict[str, str]]
"""Plain text, or a chat: a list of {"role", "content"} messages."""


CHAT_ROLES = ("system", "user", "assistant", "tool")
"""Roles a chat message may have: what chat templates render. Anything else ("usr", "bot") is a data error, not a
new role: a template would render it as it is, or fail, and the turn would be silently mis-trained."""


def _messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: a chat needs at least one 'assistant' message (the only tokens trained on)")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def parse_record(line: str, where: str, text_field: str) -> Document:
    """One JSONL line as a document (a DataError naming `where`, i.e. file:line, if it is not one)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if isinstance(record, dict) and "messages" in record:
        return _messages(record, where)
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(f"{where}: expected an object with a string field {text_field!r} or a 'messages' list")
    return record[text_field]


def is_empty(doc: Document) -> bool:
    return isinstance(doc, str) and not doc.strip()


def file_documents(f: Path, text_field: str) -> Iterator[tuple[int, Document | DataError]]:
    """(line, document) for each document of one file, or (line, DataError) for a JSONL line that is not one:
    the caller decides whether a bad line stops everything (the trainer) or is counted (training.prepare).
    Plain-text files yield blank-line-separated paragraphs (line: where the paragraph starts)."""
    text = f.read_text(encoding="utf-8")
    if f.suffix in JSONL_SUFFIXES:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield lineno, parse_record(line, f"{f}:{lineno}", text_field)
            except DataError as e:
                yield lineno, e
    else:
        # Blank-line-separated paragraphs are documents: keeps tokenizer calls bounded on large files.
        lineno = 1
        for paragraph in text.split("\n\n"):
            yield lineno, paragraph
            lineno += paragraph.count("\n") + 2


def read_documents(files: list[Path], text_field: str) -> list[Document]:
    docs: list[Document] = []
    for f in files:
        for _, doc in file_documents(f, text_field):
            if isinstance(doc, DataError):
                raise doc
            docs.append(doc)
    return [d for d in docs if not is_empty(d)]


# End-of-text tokens of common model families, tried in order when EOS itself ends a chat turn.
_END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def document_separator(tokenizer: Any) -> int | None:
    """The token between packed plain-text documents: EOS, unless the chat template uses it (then EOS means
    "end of turn", not "end of document"): then the first end-of-text token the chat template does not use.
    None (documents concatenated as they are) if there is no such token."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.eos_token_id
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    used = set(tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True)["input_ids"])
    if tokenizer.eos_token_id not in used:
        return tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    for token in _END_OF_TEXT:
        if token in vocab and vocab[token] not in used:
            return vocab[token]
    return None


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of a chat rendered with the tokenizer's template, and per token: is it part of an assistant turn.

    Templates rarely mark assistant spans (`{% generation %}`), so the spans are found by rendering growing
    prefixes: the text an assistant message adds after the generation prompt is that turn, end-of-turn included.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat data ('messages') needs a tokenizer with a chat template; this model has none")

    def text(msgs: list[dict[str, str]], prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = text(messages[:i], True) if i else ""
            pieces.append((before[len(done) :], False))
            done = before
        full = text(messages[: i + 1], False)
        if not full.startswith(done):
            raise DataError("the chat template renders a prefix of a chat differently from the chat itself")
        pieces.append((full[len(done) :], m["role"] == "assistant"))
        done = full
    ids: list[int] = []
    mask: list[bool] = []
    for piece, trained in pieces:
        if piece:
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids.extend(piece_ids)
            mask.extend([trained] * len(piece_ids))
    return ids, mask


def document_stream(
    token_ids: list[list[int]], eos_id: int | None, masks: list[list[bool]] | None = None
) -> tuple[list[int], list[bool]]:
    """Documents concatenated (`eos_id` after each, unless None) into one token stream, and per token: trained on?
    A stream of consecutive documents is the concatenation of their streams, so training.prepare builds it file
    by file and gets the stream `pack` builds over the whole dataset."""
    stream: list[int] = []
    trained: list[bool] = []
    for k, ids in enumerate(token_ids):
        stream.extend(ids)
        trained.extend(masks[k] if masks is not None else [True] * len(ids))
        if eos_id is not None:
            stream.append(eos_id)
            # After a chat the separator is context (the chat's own end-of-turn was the trained stop); after text,
            # learning "the document ends here" is part of the text.
            trained.append(masks is None or all(masks[k]))
    return stream, trained


def cut_windows(stream: torch.Tensor, trained: torch.Tensor | None, seq_len: int) -> torch.Tensor:
    """A token stream (1-D) cut into [n, seq_len + 1] windows, the tail dropped. With `trained` (the stream's label
    mask), [n, 2, seq_len + 1]: tokens and mask, without windows that train on nothing. Window i starts at token
    i * seq_len, so a slice of the stream that starts at a multiple of seq_len gives the same windows as the
    whole stream does there."""
    n = (len(stream) - 1) // seq_len
    if n <= 0:
        shape = (0, seq_len + 1) if trained is None else (0, 2, seq_len + 1)
        return torch.empty(shape, dtype=torch.long)
    # Windows overlap by one token: the last label of window i is the first input of window i+1.
    windows = stream[: n * seq_len + 1].to(torch.long).unfold(0, seq_len + 1, seq_len)
    if trained is None:
        return windows
    mask = trained[: n * seq_len + 1].to(torch.long).unfold(0, seq_len + 1, seq_len)
    both = torch.stack([windows, mask], dim=1)
    return both[mask[:, 1:].any(dim=1)]


def pack(
    token_ids: list[list[int]], eos_id: int | None, seq_len: int, masks: list[list[bool]] | None = None
) -> torch.Tensor:
    """Concatenate documents (`eos_id` after each, unless None) and cut into [n, seq_len + 1] windows; the tail
    is dropped. With `masks` (per token: trained on?), returns [n, 2, seq_len + 1]: tokens and the label mask,
    without windows that train on nothing."""
    stream, trained = document_stream(token_ids, eos_id, masks)
    return cut_windows(
        torch.tensor(stream, dtype=torch.long),
        None if masks is None else torch.tensor(trained, dtype=torch.long),
        seq_len,
    )


def tokenize_documents(tokenizer: Any, docs: list[Document]) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids of each document and per token: trained on? (text: every token; a chat: its assistant turns)."""
    texts = [d for d in docs if isinstance(d, str)]
    text_ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    ids: list[list[int]] = []
    masks: list[list[bool]] = []
    for d in docs:
        if isinstance(d, list):
            i, m = render_chat(tokenizer, d)
        else:
            i = next(text_ids)
            m = [True] * len(i)
        ids.append(i)
        masks.append(m)
    return ids, masks


def read_dataset(path: Path, text_field: str) -> list[Document]:
    """Every document under `path`, validated: the part of data loading that needs no tokenizer (and so can run,
    and fail on bad input, before the model is downloaded or loaded)."""
    docs = read_documents(list_data_files(path), text_field)
    if not docs:
        raise DataError(f"dataset at {path} is empty: no non-blank text")
    return docs


def build_sequences(
    path: Path, tokenizer: Any, seq_len: int, text_field: str, docs: list[Document] | None = None
) -> torch.Tensor:
    """Packed windows: [n, seq_len + 1] for plain text, [n, 2, seq_len + 1] (tokens, label mask) if any chat."""
    docs = read_dataset(path, text_field) if docs is None else docs
    separator = document_separator(tokenizer)
    ids, masks = tokenize_documents(tokenizer, docs)
    # Plain text only: every token is trained on, no mask. Any chat: the mask travels with the tokens.
    chat = any(isinstance(d, list) for d in docs)
    seqs = pack(ids, separator, seq_len, masks if chat else None)
    if len(seqs) == 0:
        total = sum(len(i) + 1 for i in ids)
        raise DataError(f"dataset at {path} has {total} tokens: fewer than one trainable sequence of {seq_len + 1}")
    return seqs


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of `n` packed sequences in `epoch`: a pure function of (n, seed, epoch), whatever the world size
    and whether the sequences are in memory or in prepared shards (training/shards.py)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0
    """Index into this epoch's permutation of the next sequence to read (counted over all ranks)."""


class PackedLoader:
    """Deterministic, rank-sharded iterator of (input_ids, labels) micro-batches over packed sequences.

    `sequences`: the packed tensor, or anything with its `len` and tensor indexing (training/shards.py reads prepared
    shards that way). A `torch.distributed.checkpoint.stateful.Stateful`: its state is global (the sequences read by
    all ranks together in this epoch), so a run resumes exactly on any world size: the next global micro-batches
    are the sequences the interrupted run would have read next, split among the new number of ranks.
    """

    def __init__(self, sequences: Any, micro_batch_size: int, rank: int, world_size: int, seed: int) -> None:
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
        return epoch_permutation(len(self.sequences), self.seed, epoch)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state.position + self.global_micro_batch > len(self.sequences):
            # Drop the epoch's ragged tail so that every rank always gets a full micro-batch.
            self.state = LoaderState(epoch=self.state.epoch + 1, position=0)
            self._perm = self._permutation(self.state.epoch)
        start = self.state.position + self.rank * self.micro_batch_size
        batch = self.sequences[self._perm[start : start + self.micro_batch_size]]
        self.state.position += self.global_micro_batch
        if batch.dim() == 3:  # chat data: (tokens, label mask); untrained labels get cross_entropy's ignore_index
            tokens, mask = batch[:, 0], batch[:, 1]
            return tokens[:, :-1], tokens[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.state.epoch,
            "position": self.state.position,
            "seed": self.seed,
            "sequences": len(self.sequences),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A position means "the k-th sequence of this order": with other data or another seed it points elsewhere.
        # (Checkpoints from before these keys were recorded carry only epoch and position.)
        for key, mine in (("sequences", len(self.sequences)), ("seed", self.seed)):
            if key in state and int(state[key]) != mine:
                raise DataError(
                    f"the checkpoint's data loader read {key}={state[key]}, this run has {key}={mine}: resuming "
                    "would not continue the same order (use the same data and data.seed, or a new --output)"
                )
        self.state = LoaderState(epoch=int(state["epoch"]), position=int(state["position"]))
        self._perm = self._permutation(self.state.epoch)
