"""QLoRA: one LoRA training step on a bitsandbytes nf4 base, against a float32 base and PEFT + bitsandbytes.

A step: r=16 alpha=32 on q_proj, k_proj, v_proj, o_proj (no dropout), one batch of 1 x 128 random token
ids, the model's own causal-LM loss, gradient checkpointing (non-reentrant), backward, AdamW. Models:

- Llama-architecture shapes with random weights, built layer by layer on the meta device so that no
  float copy of the whole model ever exists: SmolLM2-1.7B's (hidden 2048, 24 layers, intermediate 8192,
  vocabulary 49152, tied embedding, 32 heads) and Llama-2-7B's (4096, 32 layers, 11008, 32000, untied).
  A float32 base draws each matrix from N(0, 0.02^2). An nf4 base draws each linear layer directly in
  bitsandbytes' 4-bit form (a random nf4 code per weight, a random absmax per block of 64 weights
  around 0.036, so weights have std ~0.02), its block scales double-quantized with bitsandbytes'
  ``quantize_blockwise`` as ``BitsAndBytesConfig(bnb_4bit_use_double_quant=True)`` does; compute dtype
  float32. (bitsandbytes' CPU ``quantize_4bit`` takes ~5 s per 45M weights here: 12 min for 7B.)
- SmolLM2-135M-Instruct itself (``lorakit models install smollm2``), loaded with transformers'
  ``BitsAndBytesConfig`` (nf4, double quantization, float32 compute) or in float32; batch 8 x 128.

Cases: ``lorakit`` (``lorakit.add_lora`` on the nf4 base), ``peft`` (``peft.get_peft_model`` on the same
nf4 base, bitsandbytes' own layers), ``fp32`` (``lorakit.add_lora`` on the float32 base).

- Memory (``--part memory``): each case in its own process builds its model and runs one warm-up step
  and two timed steps (the faster is reported); the process's peak RSS (VmHWM) is reported. 7B: nf4 only
  (float32 would be 27 GB). Allocator: each case as its user gets it (``lorakit train`` caps glibc's mmap
  threshold, ``lorakit.allocator.cap_mmap_threshold``; a PEFT script keeps glibc's default), and for
  transparency the two nf4 cases the other way round too: the ``allocator`` ratios give the cap's cost
  in step time and what PEFT would gain from it.
- Speed: the cases of one model in one process, timed in alternation (``benchtools.interleave``), the
  same batches in every case; ratios are medians over rounds. Before timing, lorakit and PEFT must give
  the same loss on the same nf4 base with the same LoRA factors.

    python bench/qlora.py [--quick] [--repeats 3] [--skip-7b] [--part memory|speed]

``--part`` runs one half and keeps the other half of an existing record (the two may run at different times).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lorakit
from lorakit.allocator import cap_mmap_threshold
from lorakit.benchtools import check_close, interleave, median_ratio, summarize, write_record
from lorakit.models import resolve_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SHAPES = {  # hidden, layers, intermediate, vocabulary, heads, kv heads, tied
    "smollm2-1.7b": (2048, 24, 8192, 49152, 32, 32, True),
    "llama2-7b": (4096, 32, 11008, 32000, 32, 32, False),
    "quick": (256, 2, 512, 1024, 4, 4, True),
}
ABSMAX = 0.036  # nf4 levels have std ~0.55 over uniform codes: weights of std ~0.02


def _llama_config(shape: str):
    from transformers import LlamaConfig

    hidden, layers, inter, vocab, heads, kv, tied = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, vocab_size=vocab,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                       max_position_embeddings=2048)


def _nf4_linear(rows: int, cols: int, g: torch.Generator) -> nn.Module:
    """A bitsandbytes nf4 layer (double quantization, float32 compute) with random codes and block scales."""
    import bitsandbytes as bnb
    from bitsandbytes import functional as BF

    layer = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4", device="meta")
    codes = torch.randint(0, 256, (rows * cols // 2, 1), dtype=torch.uint8, generator=g)
    absmax = ABSMAX * (0.75 + 0.5 * torch.rand(rows * cols // 64, generator=g))
    offset = absmax.mean()
    qabsmax, state2 = BF.quantize_blockwise(absmax - offset, blocksize=256)
    state = BF.QuantState(absmax=qabsmax, shape=torch.Size([rows, cols]), dtype=torch.float32, blocksize=64,
                          code=BF.get_4bit_type("nf4", device="cpu"), quant_type="nf4", offset=offset, state2=state2)
    layer.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state, blocksize=64,
                                     compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=layer)
    layer.quant_state = state
    return layer


def _fp32_linear(rows: int, cols: int, g: torch.Generator) -> nn.Module:
    layer = nn.Linear(cols, rows, bias=False, device="meta")
    layer.weight = nn.Parameter(torch.randn(rows, cols, generator=g) * 0.02, requires_grad=False)
    return layer


def build_model(shape: str, base: str, seed: int = 0) -> nn.Module:
    """The model of ``shape`` with random weights, one linear layer materialized at a time."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    make = _nf4_linear if base == "nf4" else _fp32_linear
    for name, module in list(model.model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.model.get_submodule(parent), leaf, make(module.out_features, module.in_features, g))
        elif hasattr(module, "weight") and module.weight is not None and module.weight.is_meta:  # norms, embedding
            data = torch.ones(module.weight.shape) if "norm" in type(module).__name__.lower() else \
                torch.randn(module.weight.shape, generator=g) * 0.02
            module.weight = nn.Parameter(data, requires_grad=False)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head.weight = nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g) * 0.02,
                                            requires_grad=False)
    model.is_loaded_in_4bit = base == "nf4"  # what PEFT reads to put its bitsandbytes LoRA layers on
    return model


def load_smollm2(base: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = lorakit.quant.load_kwargs("nf4") if base == "nf4" else {}
    return AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.float32, **kwargs)


def attach(model: nn.Module, case: str) -> nn.Module:
    """LoRA r=16 on q, k, v, o: lorakit's, or PEFT's for ``peft``; gradient checkpointing; train mode."""
    if case == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    else:
        lorakit.add_lora(model, lorakit.LoraConfig(r=16, alpha=32, dropout=0.0, target_modules=TARGETS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def make_case(model_name: str, case: str) -> nn.Module:
    base = "fp32" if case == "fp32" else "nf4"
    model = load_smollm2(base) if model_name == "smollm2" else build_model(model_name, base)
    return attach(model, case)


def batches(model_name: str, n: int) -> list[torch.Tensor]:
    vocab = 49152 if model_name == "smollm2" else SHAPES[model_name][3]
    rows = 8 if model_name == "smollm2" else 1
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (rows, 128), generator=g) for _ in range(n)]


def stepper(model: nn.Module, inputs: list[torch.Tensor]):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    queue = iter(inputs * 100)

    def step() -> None:
        ids = next(queue)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _factors(model: nn.Module, case: str) -> list[torch.Tensor]:
    """The LoRA factors in module order (A then B per layer), lorakit's or PEFT's."""
    out = []
    for name, module in model.named_modules():
        if case != "peft" and isinstance(module, lorakit.LoraLayer):
            out += [module.lora_A["default"], module.lora_B["default"]]
        elif case == "peft" and name.endswith(tuple(TARGETS)) and hasattr(module, "lora_A"):
            out += [module.lora_A["default"].weight, module.lora_B["default"].weight]
    return out


@torch.no_grad()
def check_same_loss(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor) -> dict:
    """Random non-zero factors copied from lorakit into PEFT: the same loss on the same nf4 base."""
    g = torch.Generator().manual_seed(2)
    mine, other = _factors(ours, "lorakit"), _factors(theirs, "peft")
    assert len(mine) == len(other) > 0
    for a, b in zip(mine, other):
        a.copy_(torch.randn(a.shape, generator=g) * 0.02)
        b.copy_(a)
    with torch.enable_grad():  # train mode, with autograd: bitsandbytes does not repack (lorakit never does)
        loss_a, loss_b = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
    check_close(loss_a.detach(), loss_b.detach(), "lorakit vs PEFT loss on the same nf4 base", rtol=1e-5, atol=1e-5)
    return {"loss": loss_a.item(), "loss_abs_diff": (loss_a - loss_b).abs().item()}


# ---- memory: one process per case -----------------------------------------------------------


def _status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def child(model_name: str, case: str, allocator: str) -> dict:
    if allocator == "capped" and not cap_mmap_threshold():
        raise RuntimeError("cannot cap the mmap threshold here (not glibc, or MALLOC_MMAP_THRESHOLD_ is set)")
    start = time.perf_counter()
    model = make_case(model_name, case)
    built = time.perf_counter() - start
    loaded = _status_mb("VmRSS")
    step = stepper(model, batches(model_name, 3))
    times = []
    for _ in range(3):  # a warm-up step, then two timed ones
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"allocator": allocator, "build_s": built, "loaded_rss_mb": loaded, "peak_rss_mb": _status_mb("VmHWM"),
            "warmup_step_s": times[0], "step_s": min(times[1:])}


def run_child(model_name: str, case: str, allocator: str) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--model", model_name, "--allocator", allocator]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{model_name} {case} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shown = {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}
    print(f"{model_name} {case}: {json.dumps(shown)}", flush=True)
    return result


# each case as its user gets it, then the nf4 cases with the other allocator setting
MEMORY_CASES = {"lorakit": ("lorakit", "capped"), "peft": ("peft", "default"), "fp32": ("fp32", "capped"),
                "lorakit, glibc default": ("lorakit", "default"), "peft, capped": ("peft", "capped")}


def run_memory(shapes: list[str], big: str | None) -> dict:
    results = {}
    for shape in shapes:
        r = results[shape] = {name: run_child(shape, *case) for name, case in MEMORY_CASES.items()}
        peak = {name: c["peak_rss_mb"] for name, c in r.items()}
        r["ratios"] = {"lorakit/fp32 peak": peak["lorakit"] / peak["fp32"],
                       "lorakit/peft peak": peak["lorakit"] / peak["peft"],
                       "lorakit/peft peak, both capped": peak["lorakit"] / peak["peft, capped"],
                       "lorakit peak, capped/default": peak["lorakit"] / peak["lorakit, glibc default"],
                       "lorakit step, capped/default": r["lorakit"]["step_s"] / r["lorakit, glibc default"]["step_s"]}
        print(f"{shape} ratios: { {k: round(v, 3) for k, v in r['ratios'].items()} }", flush=True)
    if big:
        results[big] = {"lorakit": run_child(big, *MEMORY_CASES["lorakit"])}
        results[big]["lorakit"]["peak_rss_gb"] = results[big]["lorakit"]["peak_rss_mb"] / 1024
    return results


# ---- speed: the cases side by side ---------------------------------------------------------


def run_speed(model_name: str, repeats: int) -> dict:
    inputs = batches(model_name, repeats + 1)
    torch.manual_seed(0)
    models = {case: make_case(model_name, case) for case in ("lorakit", "peft", "fp32")}
    check = check_same_loss(models["lorakit"], models["peft"], inputs[0])
    print(f"{model_name}: same loss: {check}", flush=True)
    samples = interleave({case: stepper(m, inputs) for case, m in models.items()}, repeats=repeats)
    ratios = {"lorakit/peft": median_ratio(samples, "lorakit", "peft"),
              "lorakit/fp32": median_ratio(samples, "lorakit", "fp32"),
              "peft/fp32": median_ratio(samples, "peft", "fp32")}
    ms = {k: round(1000 * v["median_s"]) for k, v in summarize(samples).items()}
    print(f"{model_name}: ms/step {ms}, ratios { {k: round(v, 3) for k, v in ratios.items()} }", flush=True)
    return {"check": check, "cases": summarize(samples), "ratios": ratios, "batch": list(inputs[0].shape)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small Llama shape (hidden 256, 2 layers), 2 rounds")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the speed comparison")
    parser.add_argument("--skip-7b", action="store_true", help="no Llama-2-7B-shape step (it takes minutes)")
    parser.add_argument("--part", choices=["memory", "speed"], help="run only this half, keep the record's other half")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=["capped", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.child, args.allocator)))
        return
    name = "qlora_quick" if args.quick else "qlora"
    path = Path("bench/results") / f"{name}.json"
    kept = json.loads(path.read_text())["results"] if args.part and path.is_file() else {}
    memory, speed = kept.get("memory"), kept.get("speed")
    if args.part != "speed":
        memory = run_memory(["quick"], None) if args.quick else run_memory(["smollm2-1.7b"],
                                                                           None if args.skip_7b else "llama2-7b")
    if args.part != "memory":
        names = ("quick",) if args.quick else ("smollm2-1.7b", "smollm2")
        speed = {model: run_speed(model, 2 if args.quick else args.repeats) for model in names}
    config = {"r": 16, "alpha": 32, "targets": TARGETS, "batch": "1 x 128 (smollm2: 8 x 128)", "gradient_checkpointing": True,
              "optimizer": "AdamW", "base": "nf4, double quantization, float32 compute", "shapes": SHAPES,
              "bitsandbytes": __import__("bitsandbytes").__version__}
    write_record(name, config, {"memory": memory, "speed": speed})


if __name__ == "__main__":
    sys.exit(main())
