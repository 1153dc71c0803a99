"""Export a LoRA adapter to llama.cpp: its LoRA adapter GGUF (``llama-server --lora adapter.gguf``).

The file holds, for each adapted linear layer ``W: (out, in)`` of the base, two float32 tensors under
llama.cpp's name for ``W`` (gguf's own name map, ``gguf.get_tensor_name_map``; e.g. ``model.layers.0.
self_attn.q_proj`` -> ``blk.0.attn_q.weight``): ``<name>.lora_a`` = ``A: (r, in)`` and ``<name>.lora_b`` =
``B: (out, r)``, PEFT's shapes as they are (GGUF lists dimensions innermost first, so llama.cpp sees
``ne = (in, r)`` and ``(r, out)``, the shapes its loader checks). Metadata: ``general.type = "adapter"``,
``general.architecture`` (the base's), ``adapter.type = "lora"``, ``adapter.lora.alpha``.

Scaling: llama.cpp computes ``h = W x + (alpha / r_t) B A x`` with the file's one ``alpha`` and each
tensor's rank ``r_t`` (``llama_adapter_lora_weight::get_scale``). The adapter's own scaling of a layer
(``alpha_t / r_t``, rsLoRA's ``alpha_t / sqrt(r_t)``, ``rank_pattern`` / ``alpha_pattern``) is folded
into ``B`` by ``scaling_t * r_t / alpha``, a factor of exactly 1 for a plain adapter.

Row order: llama.cpp's GGUF of a ``llama`` model has the query and key rows permuted (within each head
the two rotary halves interleaved: ``convert_hf_to_gguf.py``, ``LlamaModel.permute``; transformers
permutes them back on load), so ``B``'s rows of ``q_proj`` / ``k_proj`` are permuted the same way:
``(B A)`` permuted is ``(B permuted) A``. Other architectures' rows are as in transformers.

What llama.cpp cannot take is refused by name: embeddings and ``modules_to_save`` (whole trained
copies), DoRA, bias training, a LoRA on a module llama.cpp has no tensor for (a tied LM head).

A merged model GGUF: ``lorakit merge --adapter DIR --out merged`` then llama.cpp's
``python convert_hf_to_gguf.py merged --outfile merged.gguf --outtype f16`` (docs/BENCH.md).

Expected greedy tokens (issue 34): with a :class:`ProbeRecord` the file also carries ``lorakit.*`` metadata
(llama.cpp ignores keys it does not know) to check the export in llama.cpp with (:func:`check_gguf`). The
receipt's figures are log-probabilities at every position of teacher-forced random ids, which llama-server
does not report for prompt tokens; what every llama.cpp runner reports is the next greedy token. So each probe
row (4 x 32 ids) is cut into windows of ``PROMPT_LENGTH`` = 8 ids (16 prompts: continuations of random ids are
flat, and more prompts give more positions), and lorakit's model (adapter active, float32 as for the receipt)
continues each greedily for ``NEW_TOKENS`` = 16 tokens, never a special id (no EOS stop; llama.cpp gets the
same ids banned), and stores its logit margin of each token over the runner-up. The check asks llama.cpp for
the next token after the prompt and lorakit's first ``j`` tokens, at every ``j`` (teacher-forced on lorakit's
path), rather than for one free greedy run per prompt: a free run leaves lorakit's for good at its first near
tie (on SmolLM2's Q4_1 base 8 or 9 of 16 runs did, each where lorakit's margin was below 0.3, as llama.cpp
rounds activations to 8 bits there), so whole-run equality mostly measures rounding luck. Per position, the
near ties are set aside by lorakit's margin (:func:`agreement`; figures in docs/RECEIPTS.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import LoraConfig
from .io import read_weights
from .receipt import Receipt, checksum, greedy_probes, special_ids

__all__ = ["ARCHITECTURES", "permute_rows", "gguf_adapter_tensors", "export_gguf", "ProbeRecord", "probe_record",
           "read_probe_record", "agreement", "check_gguf", "PROMPT_LENGTH", "NEW_TOKENS"]

# transformers model_type -> (GGUF architecture, whether its q/k rows are permuted in llama.cpp's GGUF)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
PROMPT_LENGTH, NEW_TOKENS = 8, 16


def _architecture(model_config: Any) -> tuple[str, bool]:
    kind = getattr(model_config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ValueError(f"llama.cpp export supports base models of type {sorted(ARCHITECTURES)}, got "
                         f"model_type={kind!r}")
    return ARCHITECTURES[kind]


def _refuse_unsupported(config: LoraConfig) -> None:
    for what, bad in (("use_dora", config.use_dora), ("modules_to_save", config.modules_to_save),
                      ("bias", config.bias != "none" and config.bias), ("enable_lora", config.enable_lora)):
        if bad:
            raise ValueError(f"llama.cpp's LoRA GGUF cannot hold {what}={bad!r}: export an adapter without it")


def _pairs(tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{module: {"A": A, "B": B}}`` from the adapter file's keys; any other key is refused by name."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"llama.cpp's LoRA GGUF holds only lora_A / lora_B of linear layers; the adapter has "
                             f"{key!r} (embeddings, modules_to_save and biases cannot be exported)")
        pairs.setdefault(match["module"], {})[match["which"]] = value
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter file has only lora_{''.join(pair)} for {module!r}: expected lora_A and lora_B")
    return pairs


def _gguf_name(name_map: Any, module: str, model_config: Any) -> str:
    if module.split(".")[-1] == "lm_head" and getattr(model_config, "tie_word_embeddings", False):
        raise ValueError(f"cannot export the LoRA on {module!r}: the base ties its LM head to the input embedding, "
                         "and llama.cpp applies no adapter there")
    name = name_map.get_name(module)
    if name is None:
        raise ValueError(f"cannot export the LoRA on {module!r}: llama.cpp has no tensor for it")
    return name + ".weight"


def permute_rows(b: Tensor, heads: int) -> Tensor:
    """Rows ``(head, half, i)`` (transformers' order) -> ``(head, i, half)`` (llama.cpp's), ``b: (out, r)``."""
    return b.reshape(heads, 2, b.shape[0] // heads // 2, -1).transpose(1, 2).reshape(b.shape)


def gguf_adapter_tensors(tensors: dict[str, Tensor], config: LoraConfig,
                         model_config: Any) -> dict[str, np.ndarray]:
    """llama.cpp's tensors for an adapter (``tensors``: its file's, PEFT keys) on a base with ``model_config``
    (transformers' config): ``{"blk.N.attn_q.weight.lora_a": A (r, in), ...lora_b: B' (out, r)}`` in float32,
    ``B'`` = ``B`` scaled to llama.cpp's ``alpha / r`` and, for llama's q / k, row-permuted (module docstring)."""
    import gguf

    _refuse_unsupported(config)
    arch, permuted = _architecture(model_config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model_config.num_hidden_layers)
    heads = {"q_proj": model_config.num_attention_heads,
             "k_proj": getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads}
    out: dict[str, np.ndarray] = {}
    for module, pair in sorted(_pairs(tensors).items()):
        name = _gguf_name(name_map, module, model_config)
        a, b = pair["A"].float(), pair["B"].float()
        r, alpha = config.rank_alpha(module)
        b = b * (config.scaling_of(r, alpha) * a.shape[0] / config.alpha)  # llama.cpp scales by alpha / r_t
        leaf = module.split(".")[-1]
        if permuted and leaf in heads:
            b = permute_rows(b, heads[leaf])
        out[name + ".lora_a"] = a.contiguous().numpy()
        out[name + ".lora_b"] = b.contiguous().numpy()
    return out


def export_gguf(adapter: str | Path, out: str | Path, model_config: Any, probes: ProbeRecord | None = None) -> Path:
    """Write the adapter folder ``adapter`` (PEFT / lorakit) as llama.cpp's LoRA adapter GGUF ``out``;
    with ``probes`` (:func:`probe_record`), also the expected greedy tokens as ``lorakit.*`` metadata."""
    import gguf

    config = LoraConfig.load(adapter)
    with torch.no_grad():
        tensors = gguf_adapter_tensors(read_weights(adapter), config, model_config)
    if probes is not None and checksum(read_weights(adapter)) != probes.adapter_sha256:
            raise ValueError(f"probes: the record is of adapter sha256 {probes.adapter_sha256[:12]}..., but the file in "
                             f"{adapter} has another checksum; make the record from this adapter's receipt")
    arch, _ = _architecture(model_config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.alpha))
    if probes is not None:
        _add_probe_record(writer, probes)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# ---- expected greedy tokens (module docstring) ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeRecord:
    """Prompts ``(P, L)``, lorakit's greedy tokens ``(P, N)`` and its logit margin of each over the runner-up
    ``(P, N)``, the ids never generated, and the sha256 of the adapter they were computed with (its receipt's)."""

    prompt_ids: Tensor
    greedy_ids: Tensor
    margins: Tensor
    banned_ids: list[int]
    adapter_sha256: str


def probe_record(model: torch.nn.Module, reference: Receipt, adapter: str = "default",
                 banned: set[int] | None = None) -> ProbeRecord | None:
    """The expected greedy tokens of ``model`` (``adapter`` active) on windows of ``PROMPT_LENGTH`` ids of the
    receipt ``reference``'s probes (a row shorter than that: the whole row); None if it has no probes.
    ``banned``: ids never generated (default: the config's special ids; the CLI adds the tokenizer's)."""
    ids = reference.tensors.get("probe.ids")
    if ids is None:
        return None
    length = min(PROMPT_LENGTH, ids.shape[1])
    prompts = ids[:, : ids.shape[1] // length * length].reshape(-1, length)  # (P, L)
    banned = sorted(special_ids(model.config) if banned is None else banned)
    greedy, margins = greedy_probes(model, adapter, prompts, NEW_TOKENS, banned)
    return ProbeRecord(prompts, greedy, margins, banned, reference.metadata["adapter_sha256"])


def _add_probe_record(writer: Any, probes: ProbeRecord) -> None:
    from . import __version__

    count, length = probes.prompt_ids.shape
    writer.add_string("lorakit.version", __version__)
    writer.add_string("lorakit.adapter_sha256", probes.adapter_sha256)
    writer.add_uint32("lorakit.probe.count", count)
    writer.add_uint32("lorakit.probe.prompt_length", length)
    writer.add_uint32("lorakit.probe.new_tokens", probes.greedy_ids.shape[1])
    writer.add_array("lorakit.probe.prompt_ids", probes.prompt_ids.reshape(-1).tolist())  # row-major (P, L)
    writer.add_array("lorakit.probe.greedy_ids", probes.greedy_ids.reshape(-1).tolist())  # (P, N)
    writer.add_array("lorakit.probe.margins", probes.margins.reshape(-1).tolist())  # (P, N), logits
    writer.add_array("lorakit.probe.banned_ids", list(probes.banned_ids))  # (an empty array is not written)


def read_probe_record(path: str | Path) -> ProbeRecord | None:
    """The ``lorakit.probe.*`` record of a GGUF written by :func:`export_gguf`; None if it has none."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    if "lorakit.probe.count" not in fields:
        return None

    def get(key: str, default: Any = None) -> Any:
        return fields[key].contents() if key in fields else default

    count, new = get("lorakit.probe.count"), get("lorakit.probe.new_tokens")
    return ProbeRecord(torch.tensor(get("lorakit.probe.prompt_ids")).reshape(count, -1),
                       torch.tensor(get("lorakit.probe.greedy_ids")).reshape(count, new),
                       torch.tensor(get("lorakit.probe.margins"), dtype=torch.float32).reshape(count, new),
                       list(get("lorakit.probe.banned_ids", [])), get("lorakit.adapter_sha256"))


# ---- checking an export in llama.cpp ---------------------------------------------------------------------------

# llama.cpp's next token must be lorakit's at MIN_CONFIDENT of the positions where lorakit's two best logits are
# NEAR_TIE or more apart (closer ones are near ties that rounding, e.g. llama.cpp's 8-bit activations, can flip).
# Measured (bench/gguf_probes.py, SmolLM2-135M, 3 adapters, 256 positions each): on the Q4_1 base an honest export
# differs only where lorakit's margin was <= 0.35 (95% of all positions equal), on an f32 base nowhere; with the
# adapter dropped or another adapter's tensors, 65-83% of the positions with margin >= 0.5 are equal.
NEAR_TIE, MIN_CONFIDENT = 0.5, 0.98


def agreement(record: ProbeRecord, got: Tensor | list[list[int]]) -> dict[str, Any]:
    """llama.cpp's next tokens ``got: (P, N)``, each after the prompt and lorakit's greedy tokens before it
    (teacher-forced on lorakit's path), against ``record``: the fraction equal at all positions and at the
    confident ones (margin >= NEAR_TIE); per probe the first position that differs (where a free greedy run in
    llama.cpp leaves lorakit's) and lorakit's margin there; ``passed`` by the rule above."""
    equal = torch.as_tensor(got) == record.greedy_ids  # (P, N)
    confident = record.margins >= NEAR_TIE
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else None for row in equal]
    probes = [{"first_difference": i, "margin": None if i is None else float(record.margins[p, i])}
              for p, i in enumerate(first)]
    share = float(equal[confident].double().mean()) if confident.any() else float("nan")
    largest = float(record.margins[~equal].max()) if not equal.all() else None
    return {"probes": probes, "count": len(probes), "same": first.count(None), "positions": equal.numel(),
            "equal": float(equal.double().mean()), "confident_positions": int(confident.sum()),
            "equal_confident": share, "largest_margin_differing": largest,
            "rule": {"near_tie": NEAR_TIE, "min_confident": MIN_CONFIDENT},
            "passed": bool(confident.any()) and share >= MIN_CONFIDENT}


def check_gguf(gguf_path: str | Path, base_gguf: str | Path, llama_server: str = "llama-server", *,
               scale: float = 1.0, threads: int | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Start ``llama_server -m base_gguf --lora gguf_path``; for each probe and position ``j`` ask
    ``/completion`` for one greedy token after the prompt and lorakit's first ``j`` tokens (ids as they are,
    the record's banned ids, the adapter at ``scale``), and compare (:func:`agreement`)."""
    record = read_probe_record(gguf_path)
    if record is None:
        raise ValueError(f"{gguf_path} holds no expected greedy tokens (lorakit.probe.*): export it with lorakit export "
                         "gguf from an adapter folder whose receipt has probes")
    binary = shutil.which(llama_server)
    if binary is None:
        raise ValueError(f"llama-server binary {llama_server!r} not found: give its path (--llama-server or "
                         "$LLAMA_SERVER)")
    if not Path(base_gguf).is_file():
        raise ValueError(f"base GGUF {str(base_gguf)!r} is not a file: give the model GGUF the adapter is served on")
    paths = torch.cat([record.prompt_ids, record.greedy_ids], 1).tolist()
    length = record.prompt_ids.shape[1]
    with _llama_server(binary, Path(base_gguf), Path(gguf_path), threads, timeout) as url:
        got = [[_next_token(url, path[: length + j], record.banned_ids, scale) for j in range(record.greedy_ids.shape[1])]
               for path in paths]
    return {**agreement(record, got), "adapter_sha256": record.adapter_sha256, "llama_tokens": got}


@contextmanager
def _llama_server(binary: str, base: Path, lora: Path, threads: int | None, timeout: float):
    """llama-server on loopback, one slot, until the block ends; yields its URL once ``/health`` answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [binary, "-m", str(base), "--lora", str(lora), "--host", "127.0.0.1", "--port", str(port), "-np", "1",
           "-c", "512", *(["-t", str(threads), "-tb", str(threads)] if threads else [])]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = " ".join(log.read().split()[-60:])
                    raise RuntimeError(f"llama-server did not start ({' '.join(cmd)}): {tail}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _next_token(url: str, prompt: list[int], banned: list[int], scale: float) -> int:
    """llama-server's greedy next token after ``prompt`` (token ids as they are), never a ``banned`` id."""
    body = {"prompt": prompt, "n_predict": 1, "temperature": 0, "ignore_eos": True, "return_tokens": True,
            "logit_bias": [[i, False] for i in banned], "cache_prompt": True, "lora": [{"id": 0, "scale": scale}]}
    request = urllib.request.Request(f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    if answer.get("tokens_evaluated") != len(prompt):
        raise RuntimeError(f"llama-server evaluated {answer.get('tokens_evaluated')} prompt tokens, sent {len(prompt)} "
                           "(a BOS added?): the comparison needs the prompt as it is")
    return answer["tokens"][0]
