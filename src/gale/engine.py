"""Sequences and the scheduler: every caller (generate, chat, the server) drives `Engine.step()`.

A step packs, without padding, one token for every decoding sequence plus prompt chunks of
sequences still prefilling, within a token budget, and runs a single forward over them. So
long prompts are prefilled chunk by chunk between other sequences' decode steps, sequences
join and leave between steps, and a sequence's tokens never depend on its neighbours.

Length limit: a sequence stops with finish_reason "length" at `max_tokens`, or when prompt +
output reaches the context length (the model's `max_seq_len` unless the caller sets
`context_len`). With a sliding window the rolling cache keeps memory flat, so `context_len` may
be raised past the trained context; without one it may not exceed the cache capacity.

Prefix caching (gale.prefix): a sequence starts from the longest stored prefix of its prompt that earlier
sequences computed (a shared system prompt, few-shot examples, the earlier turns of a chat), and every
sequence's whole blocks are stored as they fill, prompt and answer alike.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .cache import RollingCache
from .model import Transformer
from .prefix import Block, PrefixCache, common_prefix_len
from .sampling import SamplingParams, TokenLogprob, make_generator, sample_row, token_logprobs


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class TokenizerLike(Protocol):
    stop_ids: frozenset[int]

    def decoder(self, context: list[int]) -> StreamDecoder: ...


class Status(enum.Enum):
    """Where a sequence is; only `Engine` moves it, WAITING -> PREFILLING -> DECODING -> FINISHED."""

    WAITING = "waiting"  # queued for a cache slot
    PREFILLING = "prefilling"  # holds a slot; prompt tokens are left to compute
    DECODING = "decoding"  # one new token per step
    FINISHED = "finished"  # `finish_reason` says why ("error": `error` says what failed)


class SequenceFailed(RuntimeError):
    """A step failed for this sequence (the Python API raises it; the server reports it per request)."""


@dataclass(eq=False)  # compared by identity: `seq in engine.running`
class Sequence:
    """One request's state. `text` is the decoded output with stop strings cut; `emitted` of it was streamed."""

    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    decoder: StreamDecoder
    output: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    status: Status = Status.WAITING
    in_cache: int = 0  # tokens whose keys/values are in the slot (computed, or loaded from the prefix cache)
    cached_tokens: int = 0  # prompt tokens loaded from the prefix cache instead of computed
    slot: int | None = None
    finish_reason: str | None = None
    error: str | None = None  # what failed, when finish_reason is "error"
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache (prompt left to prefill, or the last sampled token)."""
        return len(self.prompt) + len(self.output) - self.in_cache

    def take_delta(self) -> str:
        """New text safe to show: nothing that could still turn out to be the start of a stop string."""
        end = len(self.text) if self.finished else len(self.text) - _stop_prefix_len(self.text, self.params.stop)
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob]

    def __str__(self) -> str:
        return self.text

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Engine:
    """Continuous batching over a pool of rolling-cache slots."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: TokenizerLike,
        *,
        max_seqs: int = 8,
        context_len: int | None = None,
        cache_len: int | None = None,
        step_tokens: int | None = None,
        prefix_cache_tokens: int = 2048,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        args = model.args
        self.model, self.tokenizer = model, tokenizer
        # kv_dtype: the cache's storage (e.g. fp16 under an fp32 model: half the memory); reads compute in model.dtype
        self.cache = RollingCache(args, max_seqs, cache_len, device=model.device, dtype=kv_dtype or model.dtype,
                                  compute_dtype=model.dtype)
        self.context_len = context_len or args.max_seq_len
        if not self.cache.rolls:
            self.context_len = min(self.context_len, self.cache.capacity)
        # The seed's chunk size is the window; without one, a chunk that keeps steps short on a CPU.
        self.step_tokens = step_tokens or min(args.sliding_window or 512, 4096)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_seqs))
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self._ids = itertools.count()
        self._weights_version = getattr(model, "weights_version", 0)

    # -- requests -------------------------------------------------------------------------
    def check_prompt(self, prompt: list[int]) -> None:
        """Raise ValueError unless the prompt is valid token ids leaving room for at least one new token."""
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self.model.args.vocab_size
        if bad := [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(prompt) >= self.context_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens but the context holds {self.context_len}: "
                f"at most {self.context_len - 1} prompt tokens leave room for an answer"
            )

    def add(self, prompt: list[int], params: SamplingParams) -> Sequence:
        self.check_prompt(prompt)
        generator = None if params.greedy else make_generator(params.seed, self.model.device)
        seq = Sequence(next(self._ids), list(prompt), params, generator, self.tokenizer.decoder(prompt))
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence now (client gone); its slot is free for the next step."""
        self._finish(seq, seq.finish_reason or "cancelled")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------
    def _admit(self) -> list[Sequence]:
        """Give waiting sequences free slots in arrival order; returns those that failed to start.

        A sequence whose prompt begins with a prefix another sequence is still prefilling keeps its place and
        waits (it will reuse those keys/values instead of computing them alongside)."""
        later, failed = [], []
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            try:
                shareable, blocks = self._stored_prefix(seq)
                if self._prefix_in_flight(shareable, len(blocks)):
                    later.append(seq)
                    continue
                self._start(seq, blocks)
            except Exception as e:  # noqa: BLE001 - this sequence fails, the others are admitted
                self._fail(seq, e)
                failed.append(seq)
        self.waiting.extendleft(reversed(later))
        return failed

    def _start(self, seq: Sequence, blocks: list[Block]) -> None:
        """Put `seq` in a free slot, starting from the stored `blocks` of its prompt; all or nothing."""
        slot = self.free_slots[0]
        self.cache.reset(slot)
        if blocks:  # start from the stored keys/values; prefill only the rest
            self.cache.load(slot, torch.cat([b.k for b in blocks], dim=2), torch.cat([b.v for b in blocks], dim=2))
        self.free_slots.pop(0)
        seq.slot, seq.status = slot, Status.PREFILLING
        seq.in_cache = seq.cached_tokens = len(blocks) * self.prefixes.block if blocks else 0
        self.running.append(seq)

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, new tokens) of the next forward: every decoding sequence's token first, then prompt chunks
        in arrival order within the rest of the step's token budget."""
        decoding = [(s, 1) for s in self.running if s.status is Status.DECODING]
        budget = max(self.step_tokens - len(decoding), 0)
        prefilling = []
        for s in self.running:
            if budget and s.status is Status.PREFILLING:
                n = min(s.pending, budget)
                prefilling.append((s, n))
                budget -= n
        return decoding + prefilling

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Run one forward; return the sequences that got a new token or finished (check `finished`, `error`,
        `take_delta()`).

        An exception fails only the sequences it concerns: one sequence's when it arises in its admission, its
        sampling or its bookkeeping, every batched sequence's when it arises in the forward. The engine stays
        consistent (failed sequences leave their slots) and keeps serving the others.
        """
        self._check_weights()
        changed = self._admit()
        batch = self._schedule()
        if not batch:
            return changed
        try:
            logits = self._forward(batch)
        except Exception as e:  # noqa: BLE001 - the forward concerns every sequence of the batch
            for seq, _ in batch:
                self._fail(seq, e)
            return changed + [s for s, _ in batch]
        for seq, n in batch:
            try:
                self._store_prefix(seq, n)
            except Exception as e:  # noqa: BLE001 - this sequence's blocks only
                self._fail(seq, e)
                changed.append(seq)
        ready = [(i, s) for i, (s, _) in enumerate(batch) if s.pending == 0 and not s.finished]
        rows = logits[[i for i, _ in ready]]
        greedy = rows.argmax(-1).tolist() if ready else []
        for j, (_, seq) in enumerate(ready):
            try:
                tok = greedy[j] if seq.params.greedy else sample_row(rows[j], seq.params, seq.generator)
                seq.status = Status.DECODING
                self._accept(seq, tok, rows[j])
            except Exception as e:  # noqa: BLE001 - e.g. a row of non-finite logits: this sequence only
                self._fail(seq, e)
        return changed + [s for _, s in ready]

    def _forward(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Logits `[B, vocab]` of each batched sequence's last new token; books the tokens as cached."""
        tokens = []
        for seq, n in batch:
            all_ids = seq.prompt + seq.output if seq.output else seq.prompt
            tokens.extend(all_ids[seq.in_cache : seq.in_cache + n])
        meta = self.cache.prepare([s.slot for s, _ in batch], [n for _, n in batch])
        logits = self.model(torch.tensor(tokens, device=self.model.device), meta, self.cache, last_only=True)
        for seq, n in batch:
            seq.in_cache += n
        return logits

    def _check_weights(self) -> None:
        """Forget stored prefixes once the model's weights changed (gale.lora bumps `model.weights_version`)."""
        version = getattr(self.model, "weights_version", 0)
        if version != self._weights_version:
            if self.prefixes is not None:
                self.prefixes.clear()
            self._weights_version = version

    def _stored_prefix(self, seq: Sequence) -> tuple[list[int], list[Block]]:
        """The part of `seq`'s prompt a stored prefix may cover (positions below the capacity, and not the last
        token, whose logits give the first answer token), and the stored blocks that begin it."""
        if self.prefixes is None:
            return [], []
        shareable = seq.prompt[: min(len(seq.prompt) - 1, self.cache.capacity)]
        return shareable, self.prefixes.match(shareable)

    def _prefix_in_flight(self, shareable: list[int], stored: int) -> bool:
        """Whether a running sequence is prefilling more of this prompt than the `stored` blocks: the prompt then
        waits (a step per chunk of the shared part) and reuses those keys/values instead of computing them
        alongside. That is n > 1 samples of one prompt, or a burst of requests with a long shared system prompt."""
        return bool(shareable) and any(
            s.status is Status.PREFILLING and common_prefix_len(shareable, s.prompt) // self.prefixes.block > stored
            for s in self.running)

    def _store_prefix(self, seq: Sequence, added: int) -> None:
        """Store `seq`'s blocks that the last step completed, while they are below the cache's capacity."""
        if self.prefixes is None:
            return
        block, capacity = self.prefixes.block, self.cache.capacity
        end = min(seq.in_cache, capacity)
        if end // block == min(seq.in_cache - added, capacity) // block:
            return
        ids = (seq.prompt + seq.output)[:end]
        self.prefixes.extend(ids, seq.in_cache - capacity, lambda a, b: self.cache.read(seq.slot, a, b))

    def _accept(self, seq: Sequence, tok: int, logits: torch.Tensor) -> None:
        p = seq.params
        if p.logprobs is not None:
            seq.logprobs.append(token_logprobs(logits, tok, p.logprobs))
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.tokenizer.stop_ids):
            self._add_text(seq, seq.decoder.flush())  # the stop token itself is not part of the answer
            self._finish(seq, "stop")
            return
        seq.output.append(tok)
        self._add_text(seq, seq.decoder.push(tok))
        if not seq.finished and (
            len(seq.output) >= p.max_tokens or len(seq.prompt) + len(seq.output) >= self.context_len
        ):
            self._add_text(seq, seq.decoder.flush())
            self._finish(seq, seq.finish_reason or "length")

    def _add_text(self, seq: Sequence, piece: str) -> None:
        if seq.finished or not piece:
            return
        start = max(0, len(seq.text) - max((len(s) for s in seq.params.stop), default=0))
        seq.text += piece
        hits = [i for i in (seq.text.find(s, start) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = seq.text[: min(hits)]
            self._finish(seq, "stop")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason, seq.status = reason, Status.FINISHED
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
            self.free_slots.sort()

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.error = f"{type(error).__name__}: {error}"
        self._finish(seq, "error")

    # -- convenience loops --------------------------------------------------------------------
    def stream(self, seqs: list[Sequence]) -> Iterator[tuple[Sequence, str]]:
        """Step until `seqs` finish, yielding (sequence, new text) as text becomes safe to show."""
        try:
            while not all(s.finished for s in seqs):
                for seq in self.step():
                    if seq in seqs:
                        if seq.error:
                            raise SequenceFailed(seq.error)
                        delta = seq.take_delta()
                        if delta:
                            yield seq, delta
        finally:
            for s in seqs:
                if not s.finished:
                    self.cancel(s)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        for p in prompts:
            self.check_prompt(p)  # all or nothing: a bad prompt must not leave others queued
        seqs = [self.add(p, sp) for p, sp in zip(prompts, params)]
        for _ in self.stream(seqs):
            pass
        return [Completion(s.text, s.output, s.finish_reason, len(s.prompt), s.logprobs) for s in seqs]
