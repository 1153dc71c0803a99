"""Continuous batching: completions for many adapters advanced together, one token per step.

A :class:`Scheduler` thread owns the model. Every step it prefills a bounded chunk of the
prompts that arrived (``prefill_chunk`` tokens, so that a long prompt never stalls running
streams for long) and then advances every running sequence by one token in a single forward
pass, each row through its own adapter (:func:`lorakit.adapter_per_row`). Sequences join
and leave the running batch between any two steps. Rows of the cache are kept compact —
running sequences first, then the ones being prefilled, in arrival order — so a step reads
its rows as one slice, with no copy. A prompt whose first blocks were prefilled before on the
same adapter starts from their keys and values (:class:`lorakit.serving.prefix_cache.PrefixCache`)
and prefills the rest.

A sequence may carry forks (OpenAI's ``n``): they take rows right after it and share its prefill;
once its prompt is read, each gets a copy of its cache row and draws its own first token from the
same logits, then runs as a sequence of its own.

Other threads talk to it through :meth:`Scheduler.submit`, :meth:`Scheduler.cancel` and
:meth:`Scheduler.call` (run a function between steps: adapter loads and unloads).
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..model import adapter_per_row
from .decoder import Decoder, Positions
from .model_decoder import ModelDecoder, compile_wanted
from .prefix_cache import PrefixCache
from .sampling import Logprob, Sampling, logprobs_of, next_token

__all__ = ["Sampling", "Sequence", "Scheduler", "Busy", "ENGINES", "pick_engine"]

SHUTTING_DOWN = "the server is shutting down"
POLL_S = 0.5  # the longest an idle scheduler sleeps
ENGINES = {"decoder": Decoder, "model": ModelDecoder}


def pick_engine(model: nn.Module, engine: str = "auto", compile: bool = False) -> str:
    """The engine that decodes ``model``: ``engine`` itself, or for ``"auto"`` the lean
    :class:`~lorakit.serving.decoder.Decoder` where it serves the family (a few % faster uncompiled,
    docs/BENCH.md "Decoding engines") and :class:`~lorakit.serving.ModelDecoder` elsewhere or
    when ``compile`` (only it compiles)."""
    if engine != "auto" and engine not in ENGINES:
        raise ValueError(f"engine must be auto or one of {', '.join(ENGINES)}, not {engine!r}")
    if (reason := ModelDecoder.refusal(model)) is not None:  # neither engine serves it, whichever was asked
        raise ValueError(reason)
    if engine == "decoder" and compile:
        raise ValueError("compiling the decode step needs the model engine, not the decoder engine")
    if engine == "auto":
        return "decoder" if not compile and Decoder.refusal(model) is None else "model"
    return engine


class Busy(Exception):
    """The scheduler's queue is full."""


class Sequence:
    """One completion: its prompt, adapter (None: the base model) and decoding, and how far it got.

    ``emit`` receives, on the scheduler's thread, ``("text", delta)`` events, then one
    ``("done", finish_reason)`` (``"stop"`` or ``"length"``) or ``("error", (status, message))``
    with an HTTP status (404: its adapter was unloaded, 500: the forward pass failed or its
    logits were not finite, 503: the scheduler stopped). ``logprobs`` holds a :class:`Logprob` per
    generated token when ``sampling.logprobs`` asks (written before the event of its text),
    ``prompt_logprobs`` one per prompt token when ``sampling.prompt_logprobs`` does (before the first event).

    ``forks``: more completions of the same prompt and adapter (their own sampling and seeds), submitted
    with this one and not on their own; they share its prefill. Ending it before its prompt is read
    ends them too.

    ``observe(first, logits)``: called with the raw logits ``(n, vocab)`` of every prompt position as each
    chunk of the prompt is prefilled (``first``: the chunk's first position; finite logits only). Such a
    sequence starts from no cached prefix and stores none: the receipt probes of
    :class:`lorakit.serving.generation.Probes` are sequences of this kind with ``max_tokens`` 0.
    """

    def __init__(self, prompt: list[int], adapter: str | None, sampling: Sampling,
                 emit: Callable[[tuple[str, Any]], None], forks: list[Sequence] | tuple[()] = (),
                 observe: Callable[[int, Tensor], None] | None = None) -> None:
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if any(f.prompt != prompt or f.adapter != adapter or f.forks for f in forks):
            raise ValueError("forks share their sequence's prompt and adapter, and have no forks of their own")
        self.prompt = prompt
        self.adapter = adapter
        self.sampling = sampling
        self.emit = emit
        self.tokens: list[int] = []  # generated so far (without a final EOS)
        self.sampled = 0  # tokens drawn, a final EOS included
        self.length = 0  # positions in the cache
        self.cached = 0  # prompt tokens whose keys and values came from the prefix cache
        self.row = -1
        self.sent = 0  # characters of the text already emitted
        self.finished = False
        self.generator = None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
        self.logprobs: list[Logprob] = []
        self.prompt_logprobs: list[Logprob] = []
        self.forks = list(forks)  # until the prompt is read (then they run on their own)
        self.parent: Sequence | None = None  # a fork's, until then
        self.observe = observe
        for fork in forks:
            fork.parent = self

    @property
    def every_position(self) -> bool:
        """Whether prefilling reads the logits of every prompt position (not only the last)."""
        return self.sampling.prompt_logprobs is not None or self.observe is not None


class Scheduler:
    """The model's thread: admits, prefills, decodes and retires :class:`Sequence` s.

    ``max_rows`` sequences run at once (1: no batching across requests); ``max_queue`` more
    may wait; ``max_length`` bounds prompt plus completion; ``eos`` ends a completion.
    ``engine`` runs the forward passes: ``"decoder"`` (:class:`lorakit.serving.decoder.Decoder`, a lean
    forward of its own for Llama-style decoders and GPT-2), ``"model"``
    (:class:`lorakit.serving.ModelDecoder`, the model's own modules, every served family) or
    ``"auto"`` (:func:`pick_engine`); :attr:`engine` names the one chosen. ``compile``: a single
    stream's decode step under ``torch.compile`` (model engine; default: ``LORAKIT_COMPILE``).
    ``prefix_cache_tokens`` bounds the :class:`~lorakit.serving.prefix_cache.PrefixCache` (0, the default here: off;
    ``lorakit serve`` turns it on); whoever changes an adapter's weights in place, or unloads it, calls
    ``scheduler.prefix.invalidate(name)``. ``check_factors=False``: adapters are only added and removed,
    never changed in place, so steps skip checking the stacked copies of their factors
    (:func:`lorakit.adapter_per_row`).
    """

    def __init__(self, model: nn.Module, tokenizer, *, eos: set[int], max_rows: int = 64, max_queue: int = 256,
                 max_length: int = 2048, prefill_chunk: int = 256,
                 engine: Literal["auto", "decoder", "model"] = "auto", compile: bool | None = None,
                 prefix_cache_tokens: int = 0, check_factors: bool = True) -> None:
        compile = compile_wanted() if compile is None else compile
        self.check_factors = check_factors
        self.engine = pick_engine(model, engine, compile)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decoder = ModelDecoder(model, compile) if self.engine == "model" else Decoder(model)
        self.max_length = min(max_length, self.decoder.max_positions)
        self.cache = self.decoder.cache(max_rows, self.max_length)
        self.prefix = PrefixCache(prefix_cache_tokens)
        self.eos = eos
        self.max_rows, self.max_queue, self.prefill_chunk = max_rows, max_queue, prefill_chunk
        self.rows: list[Sequence] = []  # running (self.running of them), then being prefilled
        self.running = 0
        self.waiting: deque[Sequence] = deque()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.queued = 0  # submitted, not yet given a row (read by other threads)
        self._lock = threading.Lock()
        self.steps = self.tokens = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False  # stopped: new sequences and calls are refused (under self._lock)
        self._low = 0  # consecutive steps with the cache under a quarter used

    # ---- other threads ---------------------------------------------------------------------

    def start(self) -> None:
        """Run the scheduler on a thread of its own (see :meth:`run`)."""
        self._thread = threading.Thread(target=self.run, name="lorakit-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End :meth:`run` after its current step: every sequence in flight or queued ends
        with a 503 error, later ones are refused (safe from a signal handler on its thread)."""
        self._stop = True
        self.inbox.put(("wake",))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def submit(self, seq: Sequence, limit: bool = True) -> None:
        """Queue ``seq`` (and its forks); beyond ``max_queue`` only without ``limit`` (the server's own rows)."""
        if seq.parent is not None:
            raise ValueError("a fork is submitted with its sequence, not on its own")
        if 1 + len(seq.forks) > self.max_rows:
            raise ValueError(f"{1 + len(seq.forks)} completions of one prompt exceed the {self.max_rows} rows "
                             "decoded at once")
        with self._lock:
            if self._closed:
                raise Busy(SHUTTING_DOWN)
            if limit and self.queued >= self.max_queue:
                raise Busy(f"server busy: {self.max_queue} completions already queued; retry later")
            self.queued += 1
            self.inbox.put(("add", seq))  # (under the lock: nothing is added once closed)

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` and free its row (no more events)."""
        self.inbox.put(("cancel", seq))

    def call(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """``fn(*args)`` on the scheduler's thread, between two steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                future.set_exception(Busy(SHUTTING_DOWN))
            else:
                self.inbox.put(("call", fn, args, future))
        return future

    def warm_up(self, tokens: int = 80) -> None:
        """One completion of ``tokens`` greedy tokens on the base model, discarded (before serving, on the
        calling thread): a compiled decode step (``compile``) is compiled now, about a minute per graph on 2
        cores, rather than during the first requests. Long enough for the row cache to grow past its first
        size; the graphs take any adapter (:class:`lorakit.serving.model_decoder._OneRow`)."""
        prompt = [getattr(self.tokenizer, "bos_token_id", None) or 0] * 4
        tokens = max(1, min(tokens, self.max_length - len(prompt)))
        self.submit(Sequence(prompt, None, Sampling(max_tokens=tokens, temperature=0, ignore_eos=True), lambda e: None))
        self.run_until_done()
        self.steps = self.tokens = self.prefix.queries = self.prefix.hits = 0

    def run_until_done(self) -> None:
        """Run every submitted sequence to its end on the calling thread (offline use, without :meth:`start`)."""
        self._drain(block=False)
        while self.rows or self.waiting:
            self._step()
            self._release()
        self._release()

    # ---- the scheduler's thread ----------------------------------------------------------------

    def run(self) -> None:
        """The scheduler's loop on the calling thread, until :meth:`stop`. ``lorakit serve``
        runs it on the main thread: torch's operations issued from another thread ran with a
        single OpenMP thread here (53 instead of 35 ms per token, 2 cores)."""
        while not self._stop:
            try:
                self._drain(block=not (self.rows or self.waiting))
                self._step()
                self._release()
            except Exception as e:  # a bug or out of memory: fail the sequences in flight, keep serving
                failed, self.rows, self.running = self.rows, [], 0
                for seq in failed:
                    seq.row = -1
                for seq in failed:  # (a sequence's forks end with it)
                    self._fail(seq, 500, f"generation failed: {type(e).__name__}: {e}")
        self._close()

    def _close(self) -> None:
        """Stopped: end what is queued, running or still in the inbox with a 503."""
        with self._lock:
            self._closed = True
        self._drain(block=False)  # the last calls run, the last sequences join the waiting ones
        self.retire(lambda seq: True, 503, SHUTTING_DOWN)

    SHRINK_AFTER = 32  # steps with the cache under a quarter used before it shrinks (no thrashing on a dip)

    def _release(self) -> None:
        """Give cache memory back: at once when idle, else after ``SHRINK_AFTER`` steps under a quarter used."""
        if not self.rows and not self.waiting:
            self._low = 0
            self.cache.fit(0, 0)
            return
        length = max(s.length for s in self.rows) if self.rows else 0
        low = 4 * len(self.rows) * length <= self.cache.rows * self.cache.capacity
        self._low = self._low + 1 if low else 0
        if self._low >= self.SHRINK_AFTER:
            self._low = 0
            self.cache.fit(len(self.rows), length)

    def _step(self) -> None:
        self._admit()
        if len(self.rows) > self.running:
            self._prefill()
        if self.running:
            self._decode()

    def _drain(self, block: bool) -> None:
        while True:
            try:  # (idle, it wakes up now and then: a signal that another thread received is only
                # handled on the main thread once it runs again, e.g. Ctrl-C for lorakit serve)
                message = self.inbox.get(block=block, timeout=POLL_S if block else None)
            except queue.Empty:
                return
            block = False
            kind = message[0]
            if kind == "add":
                self.waiting.append(message[1])
            elif kind == "cancel":
                self._drop(message[1])
            elif kind == "call":
                _, fn, args, future = message
                try:
                    future.set_result(fn(*args))
                except BaseException as e:
                    future.set_exception(e)

    def _dequeued(self) -> None:
        with self._lock:
            self.queued -= 1

    def _admit(self) -> None:
        """Rows for the waiting sequences, in order: each with its forks right after it."""
        while self.waiting:
            seq = self.waiting[0]
            seq.forks = [f for f in seq.forks if not f.finished]
            if len(self.rows) + 1 + len(seq.forks) > self.max_rows:
                return
            self.waiting.popleft()
            self._dequeued()
            for s in (seq, *seq.forks):
                s.row = len(self.rows)
                self.rows.append(s)

    def _forward(self, seqs: list[Sequence], ids: Tensor, start: Tensor, last: Positions = None) -> Tensor:
        rows = slice(seqs[0].row, seqs[0].row + len(seqs))
        with adapter_per_row(self.model, [s.adapter for s in seqs], self.check_factors):
            return self.decoder.forward(ids, self.cache, rows, start, last)

    def _prefill(self) -> None:
        """The next ``prefill_chunk`` prompt tokens of the sequences waiting for their first token."""
        budget, chunks = self.prefill_chunk, []
        for seq in self.rows[self.running:]:
            if seq.length == 0 and not seq.every_position:  # (here, not at admission: what the chunks before
                self._reuse_prefix(seq)  # it stored counts; echo and probes need every position's logits)
            n = min(len(seq.prompt) - seq.length, budget)
            chunks.append((seq, n))
            budget -= n
            if budget == 0 or seq.forks:  # (rows of one forward are contiguous: its forks' rows come next)
                break
        width = max(n for _, n in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        for i, (seq, n) in enumerate(chunks):
            ids[i, :n] = torch.tensor(seq.prompt[seq.length : seq.length + n])
        start = torch.tensor([seq.length for seq, _ in chunks])
        seqs = [s for s, _ in chunks]
        # each row's last token; every token of the prompts whose log-probabilities are asked for
        rows, index, last = [], [], []
        for i, (seq, n) in enumerate(chunks):
            every = seq.every_position
            rows += [i] * (n if every else 1)
            index += range(n) if every else [n - 1]
            last.append(len(index) - 1)
        out = self._forward(seqs, ids, start, (torch.tensor(rows), torch.tensor(index)))
        logits = out[last]
        finite = self._finite(seqs, logits)
        for i, (seq, n) in enumerate(chunks):
            if seq.sampling.prompt_logprobs is not None and finite[i]:
                finite[i] = self._prompt_logprobs(seq, out[last[i] - n + 1 : last[i] + 1])
            if seq.observe is not None and finite[i]:
                seq.observe(seq.length, out[last[i] - n + 1 : last[i] + 1])
        done = []
        for seq, n in chunks:
            seq.length += n
            if seq.length == len(seq.prompt):  # a prefix of the chunks: all but the last got all they needed
                seq.forks = [f for f in seq.forks if f.row >= 0]  # (those cancelled meanwhile left their rows)
                self.running += 1 + len(seq.forks)  # (its forks' rows follow its own)
                done.append(seq)
        for seq, ok in zip(seqs, finite):
            if ok and seq.observe is None:
                self.prefix.store(seq.adapter, seq.prompt, seq.length, functools.partial(self.cache.read, seq.row))
        for seq, ok in zip(seqs[len(done) :], finite[len(done) :]):  # (the last, when prefilled in part)
            if not ok:
                self._fail(seq, 500, _non_finite(seq.adapter))
        self._start(done, logits[: len(done)], finite[: len(done)])

    def _prompt_logprobs(self, seq: Sequence, logits: Tensor) -> bool:
        """Add the log-probabilities of the prompt tokens that ``logits`` ``(n, vocab)``, the chunk just
        prefilled from position ``seq.length``, predict; whether they are finite (else the row is cleared)."""
        if not bool(torch.isfinite(logits.amax(-1)).all() and torch.isfinite(logits.amin(-1)).all()):
            self.cache.clear(seq.row)
            return False
        first = seq.length
        if first == 0:
            seq.prompt_logprobs.append(Logprob(seq.prompt[0], None))
        targets = seq.prompt[first + 1 : first + 1 + len(logits)]  # (the last position predicts no prompt token)
        if targets:
            seq.prompt_logprobs += logprobs_of(logits[: len(targets)], targets, seq.sampling.prompt_logprobs)
        return True

    def _start(self, seqs: list[Sequence], logits: Tensor, finite: list[bool]) -> None:
        """The first tokens of ``seqs``, whose prompts are now read, from their rows of ``logits``: each
        fork gets a copy of its sequence's cache row and draws from the same logits. A sequence with
        ``max_tokens`` 0 (its prompt's log-probabilities only) ends here, with its forks."""
        group, rows, ok = [], [], []
        for i, seq in enumerate(seqs):
            if seq.sampling.max_tokens == 0:
                self._end(seq, ("done", "length") if finite[i] else ("error", (500, _non_finite(seq.adapter))))
                continue
            forks, seq.forks = seq.forks, []
            if forks:  # (rows may have moved: an echo-only sequence before it in seqs ended)
                self.cache.reserve(max(f.row for f in forks) + 1, seq.length)
            for fork in forks:
                self.cache.move(seq.row, fork.row, seq.length)
                fork.length, fork.parent = seq.length, None
            group += [seq, *forks]
            rows += [i] * (1 + len(forks))
            ok += [finite[i]] * (1 + len(forks))
        self._advance(group, logits[rows], ok)

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start ``seq`` from the cached keys and values of its prompt's longest stored prefix, if any."""
        kv = self.prefix.lookup(seq.adapter, seq.prompt)
        if kv is not None:
            self.cache.write(seq.row, kv)
            seq.length = seq.cached = kv.shape[3]

    def _decode(self) -> None:
        seqs = self.rows[: self.running]
        ids = torch.tensor([[s.tokens[-1]] for s in seqs])
        logits = self._forward(seqs, ids, torch.tensor([s.length for s in seqs]))
        for s in seqs:
            s.length += 1
        self.steps += 1
        self._advance(seqs, logits, self._finite(seqs, logits))

    def _finite(self, seqs: list[Sequence], logits: Tensor) -> list[bool]:
        """Whether each row of ``logits`` is finite; the cache rows of those that are not are
        zeroed (a masked position is read with weight 0: harmless only if it is finite)."""
        # (max and min carry NaN and infinities; isfinite(logits).all(-1) took 20x longer: 3.5 ms a step at 32 rows)
        finite = (torch.isfinite(logits.amax(-1)) & torch.isfinite(logits.amin(-1))).tolist()
        for seq, ok in zip(seqs, finite):
            if not ok:
                self.cache.clear(seq.row)
        return finite

    def _advance(self, seqs: list[Sequence], logits: Tensor, finite: list[bool]) -> None:
        """Each sequence's next token from its row of ``logits`` ``(len(seqs), vocab)``; emit
        text; retire finished ones. A row whose logits are not ``finite`` (an adapter whose
        weights overflow) ends alone with an error: no other row depends on it."""
        if not seqs:
            return
        tokens = self._pick(seqs, logits, finite)
        self._logprobs(seqs, logits, tokens)
        ended: list[tuple[Sequence, tuple[str, Any]]] = []
        for seq, token in zip(seqs, tokens):
            if token is None:
                ended.append((seq, ("error", (500, _non_finite(seq.adapter)))))
                continue
            self.tokens += 1
            reason = self._append(seq, token)
            if reason:
                ended.append((seq, ("done", reason)))
        for seq, event in ended:
            self._end(seq, event)

    @staticmethod
    def _pick(seqs: list[Sequence], logits: Tensor, finite: list[bool]) -> list[int | None]:
        """Each row's next token (None where its logits are not finite): the argmax of plain greedy rows
        in one call, :func:`~lorakit.serving.sampling.next_token` for the others."""
        plain = [i for i, s in enumerate(seqs) if finite[i] and s.sampling.temperature == 0 and not s.sampling.penalized]
        picks = dict(zip(plain, logits[plain].argmax(-1).tolist())) if plain else {}
        return [picks[i] if i in picks else None if not finite[i] else
                next_token(logits[i], s.sampling, s.prompt, s.tokens, s.generator) for i, s in enumerate(seqs)]

    @staticmethod
    def _logprobs(seqs: list[Sequence], logits: Tensor, tokens: list[int | None]) -> None:
        """Each picked token's log-probability, of the raw logits, where its sequence asks (one call for all rows)."""
        want = [i for i, s in enumerate(seqs) if s.sampling.logprobs is not None and tokens[i] is not None]
        if not want:
            return
        k = max(seqs[i].sampling.logprobs for i in want)
        for i, entry in zip(want, logprobs_of(logits[want], [tokens[i] for i in want], k)):
            seqs[i].logprobs.append(Logprob(entry.token, entry.logprob, entry.top[: seqs[i].sampling.logprobs]))

    def _append(self, seq: Sequence, token: int) -> str | None:
        """Add ``token``, emit the text that is now certain; the finish reason, if it ends here."""
        reason = None
        seq.sampled += 1
        if token in self.eos and not seq.sampling.ignore_eos:
            reason = "stop"
        else:
            seq.tokens.append(token)
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in seq.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None and (len(seq.tokens) >= seq.sampling.max_tokens or seq.length >= self.max_length):
            reason = "length"
        end = len(text)
        if reason is None:  # hold back what may be half a character or the start of a stop string
            end -= max((len(s) - 1 for s in seq.sampling.stop), default=0)
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
        if end > seq.sent:
            seq.emit(("text", text[seq.sent : end]))
            seq.sent = end
        return reason

    def _fail(self, seq: Sequence, status: int, message: str) -> None:
        self._end(seq, ("error", (status, message)))

    def _end(self, seq: Sequence, event: tuple[str, Any]) -> None:
        """``seq`` (and its forks, before its prompt is read) ends with ``event``; once only."""
        ending = [s for s in (seq, *seq.forks) if not s.finished]
        self._drop(seq)
        for s in ending:
            s.emit(event)

    def _drop(self, seq: Sequence) -> None:
        """Take ``seq`` and its forks out of the queue and the rows: finished, without an event."""
        for s in (seq, *seq.forks):
            if s in self.waiting:
                self.waiting.remove(s)
                self._dequeued()
            if s.row >= 0:
                self._remove(s)
            s.finished = True
        seq.forks = []

    def retire(self, predicate: Callable[[Sequence], bool], status: int, message: str) -> None:
        """End every queued or running sequence for which ``predicate`` holds with an error
        (on the scheduler's thread: from a function given to :meth:`call`)."""
        for seq in [s for s in [*self.waiting, *self.rows] if predicate(s)]:
            self._fail(seq, status, message)

    def _remove(self, seq: Sequence) -> None:
        """Free ``seq``'s row, keeping the rows compact and in order: running rows fill the gap
        with the last running one; the prefilling rows then move down by one."""
        i, seq.row = seq.row, -1
        if i < self.running:
            last = self.running - 1
            if i != last:
                self._move(last, i)
            self.running -= 1
            i = last
        for j in range(i + 1, len(self.rows)):
            self._move(j, j - 1)
        self.rows.pop()

    def _move(self, src: int, dst: int) -> None:
        seq = self.rows[src]
        if seq.length:  # (a row not prefilled yet may lie past the cache's rows so far)
            self.cache.move(src, dst, seq.length)
        self.rows[dst] = seq
        seq.row = dst


def _non_finite(adapter: str | None) -> str:
    who = "the base model" if adapter is None else f"adapter {adapter!r}"
    return (f"{who} produced non-finite logits (NaN or infinity): its weights or scaling overflow; "
            "this request is ended, the others go on")
