"""The generation engine of ``lorakit serve``: a causal LM, its adapters and the :class:`Scheduler` that
decodes every request's sequences together (continuous batching across adapters)."""

import asyncio
import concurrent.futures
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import quant
from ..io import load_adapter
from ..model import remove_adapter
from ..models import resolve_model
from ..precision import resolve_precision
from ..receipt import Receipt
from ..tasks.lm import load_causal_lm
from . import verify
from .adapters import adapter_folder, check_name, clip, task_info
from .config import ClientError, ServeConfig
from .sampling import Sampling
from .scheduler import Busy, Scheduler, Sequence

__all__ = ["GenAdapter", "GenerationEngine", "Probes"]


@dataclass
class GenAdapter:
    name: str
    path: str
    task: str | None
    receipt: dict[str, Any] = field(default_factory=dict)  # its receipt's check (lorakit.serving.verify.summary)

    def public(self, with_path: bool = False) -> dict[str, Any]:
        return {"name": self.name, **({"path": self.path} if with_path else {}), "task": self.task,
                "receipt": self.receipt}


class Probes:
    """A receipt's probe rows as scheduler :class:`Sequence` s that read their prompts only (``max_tokens`` 0);
    :attr:`future` gets their log-probabilities ``(rows x length, V)``, or an exception if a row fails."""

    def __init__(self, reference: Receipt, adapter: str) -> None:
        ids = reference.tensors["probe.ids"].long()
        self.rows, self.length = ids.shape
        self.reference = reference
        self.log_probs: torch.Tensor | None = None
        self.left = self.rows
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.sequences = [Sequence(ids[i].tolist(), adapter, Sampling(max_tokens=0), functools.partial(self._emit, i),
                                   observe=functools.partial(self._observe, i)) for i in range(self.rows)]

    def _observe(self, row: int, first: int, logits: torch.Tensor) -> None:
        if self.log_probs is None:
            self.log_probs = torch.empty(self.rows * self.length, logits.shape[-1])
        at = row * self.length + first
        self.log_probs[at : at + len(logits)] = torch.log_softmax(logits.float(), dim=-1)

    def _emit(self, row: int, event: tuple[str, Any]) -> None:
        kind, value = event
        if self.future.done():
            return
        if kind == "error":
            self.future.set_exception(RuntimeError(f"probe row {row} failed: {value[1]}"))
        elif kind == "done":
            self.left -= 1
            if self.left == 0:
                self.future.set_result(self.log_probs)


class GenerationEngine:
    """A causal LM, its adapters and the :class:`Scheduler` that runs them.

    ``quantize`` (``int8``: q8_0 weights; ``int4``: q4_1 layers and a q8_0 LM head;
    :func:`lorakit.quant.linear.quantize_model`) rounds the base's linear layers when the server
    starts, read as they are from the GGUF the model was installed from where there is one
    (``lorakit models install smollm2``). The layers adapted by the adapters loaded by then keep
    their float weight beside the quantized copy (adapters stay float, per row); adapters loaded
    later must target those same layers. The kernels compute in fp32 from activations of any
    dtype, so ``--precision bf16`` works too (the model is cast after quantizing).
    """

    def __init__(self, model_name: str, config: ServeConfig, precision: str = "auto", quantize: str | None = None) -> None:
        self.model_name = model_name
        self.precision = resolve_precision(precision, quantized=bool(quantize))
        quant.check_quantize(quantize)
        if quantize:
            quant.require_kernels(f"--quantize {quantize}")  # before loading the model: no compiler, no wait
        self.quantize = quantize
        self.tokenizer, model = load_causal_lm(model_name)
        if self.precision == "bf16" and not quantize:  # weights in bf16: autocast would convert them at every step
            model.to(torch.bfloat16)  # (quantized: after quantizing, from the float weights; see prepare)
        self.model, self.config = model.eval(), config
        self.scheduler = self._scheduler()
        self.adapters: dict[str, GenAdapter] = {}
        self.pending: dict[str, tuple[GenAdapter, Receipt]] = {}  # loaded, their receipt's probes not yet run
        self.vocab = model.get_input_embeddings().weight.shape[0]  # token ids a prompt may hold
        self.token_text = functools.cache(self._token_text)

    def _token_text(self, token: int) -> str:
        """A token's text as the tokenizer decodes it alone (OpenAI's ``logprobs`` name tokens so)."""
        return self.tokenizer.decode([token])

    def _scheduler(self) -> Scheduler:
        eos = self.model.generation_config.eos_token_id
        eos = {self.tokenizer.eos_token_id, *([] if eos is None else [eos] if isinstance(eos, int) else eos)}
        c = self.config
        return Scheduler(self.model, self.tokenizer, eos=eos, max_rows=c.max_batch_rows if c.batching else 1,
                         max_queue=c.max_queue, max_length=c.max_length + c.max_new_tokens, prefill_chunk=c.prefill_chunk,
                         engine=c.engine, compile=c.compile or None, prefix_cache_tokens=c.prefix_cache_tokens,
                         check_factors=False)  # (adapters change only through load and unload)

    async def call(self, fn, *args):
        """``fn(*args)`` on the scheduler's thread, between two decode steps."""
        try:
            return await asyncio.wrap_future(self.scheduler.call(fn, *args))
        except Busy as e:  # the scheduler has stopped
            raise ClientError(503, str(e)) from None

    main_thread = False  # True: the caller runs self.scheduler.run() on the main thread (lorakit serve)
    quantized: str | None = None  # prepare() has run --quantize: what it did, in one line
    warmed = False  # prepare() has compiled the decode step (--compile)
    check_s = 0.0  # seconds prepare() took to check the start-up adapters' receipts

    def prepare(self) -> None:
        """Quantize (once) now that the start-up adapters are loaded, then cast to bf16 if asked; compile the
        decode step (``--compile``: :meth:`Scheduler.warm_up`); before the scheduler starts."""
        if self.quantize and not self.quantized:
            from ..quant.gguf import installed
            from ..quant.linear import quantize_model

            self.quantized = quantize_model(self.model, self.quantize, installed(resolve_model(self.model_name)))
            if self.precision == "bf16":
                self.model.to(torch.bfloat16)
            self.scheduler = self._scheduler()  # its row cache in the model's dtype, its decoder on the new layers
        if getattr(self.scheduler.decoder, "compiled", False) and not self.warmed:
            print("lorakit serve: compiling the decode step (--compile; about a minute per graph on 2 cores)", flush=True)
            self.scheduler.warm_up()
            self.warmed = True
        if self.pending:
            self._verify_start_up()

    def _verify_start_up(self) -> None:
        """The start-up adapters' receipt checks, before serving (on the calling thread), one adapter at a time
        (each holds its probes' log-probabilities, 25 MB for SmolLM2); a ValueError naming those that do not
        reproduce under ``strict``."""
        refused, start = [], time.perf_counter()
        for name, (adapter, _) in list(self.pending.items()):
            probes = self._probes(name)
            self.scheduler.run_until_done()
            try:
                self._settle(adapter, self._check(probes, adapter))
            except ClientError as e:
                refused.append(str(e))
        self.check_s = time.perf_counter() - start
        s = self.scheduler
        s.steps = s.tokens = s.prefix.queries = s.prefix.hits = 0
        if refused:
            raise ValueError("\n".join(refused))
        checked = {a.name: a.receipt["status"] for a in self.adapters.values()}
        print(f"lorakit serve: receipts: {', '.join(f'{k} {v}' for k, v in sorted(checked.items()))} "
              f"(checked in {self.check_s:.1f} s)", flush=True)

    def _probes(self, name: str) -> Probes:
        """The probes of pending adapter ``name``, submitted (cut to the scheduler's sequence length)."""
        reference = verify.first_positions(self.pending[name][1], self.scheduler.max_length)
        probes = Probes(reference, name)
        for seq in probes.sequences:
            self.scheduler.submit(seq, limit=False)  # (four rows of an admin's load; never refused as a client's)
        return probes

    def _check(self, probes: Probes, adapter: GenAdapter) -> dict[str, Any]:
        """The receipt check of ``adapter`` from its ``probes`` (done)."""
        try:
            log_probs = probes.future.result()
        except RuntimeError as e:
            return verify.failed(str(e))
        return verify.check(probes.reference, self.model, adapter.name, adapter.path, log_probs,
                            self.config.verify_tolerance)

    def _settle(self, adapter: GenAdapter, report: dict[str, Any] | None) -> GenAdapter:
        """Serve ``adapter`` with its check's ``report`` (None: no receipt), or, under ``strict`` where it
        fails, detach it and raise a 400 that says why."""
        self.pending.pop(adapter.name, None)
        adapter.receipt = verify.settle(adapter.name, report, self.config.verify_adapters,
                                        functools.partial(remove_adapter, self.model, adapter.name))
        self.adapters[adapter.name] = adapter
        return adapter

    async def verify(self, name: str) -> GenAdapter:
        """Check the receipt of ``name``, just loaded while serving: its probes as scheduler rows (running
        streams go on), then serve it or refuse it (:meth:`_settle`). The adapter waits, unnamed by requests."""
        adapter = self.pending[name][0]
        probes = None
        try:
            probes = self._probes(name)
            await asyncio.wrap_future(probes.future)
            report = await asyncio.to_thread(self._check, probes, adapter)
        except BaseException as e:  # a stopped scheduler, a cancelled request: detach it
            for seq in probes.sequences if probes else ():
                self.scheduler.cancel(seq)
            self.scheduler.call(self._discard, name)
            if isinstance(e, Busy):
                raise ClientError(503, f"adapter {name!r} was not loaded: {e}") from None
            raise
        return await self.call(self._settle, adapter, report)

    def _discard(self, name: str) -> None:
        if self.pending.pop(name, None) is not None:
            remove_adapter(self.model, name)

    def start(self) -> None:
        self.prepare()
        if not self.main_thread:
            self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def health(self) -> dict[str, Any]:
        s = self.scheduler
        return {"engine": s.engine, "running": len(s.rows), "queued": s.queued, "steps": s.steps, "tokens": s.tokens}

    def load(self, name: str, path: str, task: str | None = None) -> GenAdapter:
        check_name(name)
        if name in self.adapters or name in self.pending or name == self.model_name:
            raise ClientError(409, f"the name {name!r} is taken; DELETE that adapter first or choose another name")
        folder = adapter_folder(path)
        info = task_info(folder)
        trained_on = info.get("model")
        try:
            if trained_on and resolve_model(trained_on) != resolve_model(self.model_name):
                raise ClientError(400, f"adapter {name!r} was trained on {trained_on!r}, but this server runs "
                                       f"{self.model_name!r}")
            load_adapter(self.model, folder, name)
        except (ValueError, TypeError, RuntimeError, MemoryError) as e:
            hint = f" (the server's {self.quantize} layers take no new adapters: adapt the layers the start-up adapters " \
                "adapt)" if self.quantize else ""
            raise ClientError(400, " ".join(str(e).split())[:1000] + hint) from None
        adapter = GenAdapter(name, str(folder), task or info.get("task"))
        reference = verify.receipt_of(folder, self.config.verify_adapters)
        if isinstance(reference, dict):  # unreadable
            return self._settle(adapter, reference)
        if reference is None or "probe.ids" not in reference.tensors:
            return self._settle(adapter, reference and verify.check(reference, self.model, name, folder, None,
                                                                    self.config.verify_tolerance))
        self.pending[name] = (adapter, reference)  # (verify() or prepare() runs its probes)
        return adapter

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise ClientError(404, f"no adapter named {clip(name)!r}; loaded: {sorted(self.adapters)}")
        self.scheduler.retire(lambda s: s.adapter == name, 404, f"adapter {name!r} was unloaded")
        del self.adapters[name]
        remove_adapter(self.model, name)
        self.scheduler.prefix.invalidate(name)  # (a later adapter of this name gets a new root)

    def resolve(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base model)."""
        if model == self.model_name:
            return None
        if model not in self.adapters:
            available = [self.model_name, *sorted(self.adapters)]
            raise ClientError(404, f"no model or adapter named {clip(model)!r}; available: {available}")
        return model
