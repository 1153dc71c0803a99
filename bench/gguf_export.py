"""``lorakit export gguf`` checked against llama.cpp (#29 item 5): the same greedy text on E2E MRs.

Per adapter: ``lorakit.export.export_gguf`` writes its LoRA GGUF; llama.cpp's ``llama-server`` runs a base GGUF
with ``--lora adapter.gguf``, one thread; lorakit runs the float32 model of its SmolLM2 folder with the adapter
(``lorakit.generate.generate_ids``, greedy, one prompt at a time). Both get the same prompt token ids (as
``lorakit eval`` builds them from task.json) and at most ``--max-new-tokens``; a completion ends at EOS.
Counted: MRs whose completion text is the same, and, where they differ, lorakit's logit margin of its token
over llama.cpp's at the first difference (a near tie: rounding, not a wrong adapter).

Bases: ``q4_1``, the GGUF lorakit's SmolLM2 folder was dequantized from (``bench/serve_gen.py``'s
``smollm2_gguf``; llama.cpp multiplies its 4-bit blocks by 8-bit-rounded activations), and any ``--base
NAME=GGUF``, e.g. ``f32``: the lorakit folder through llama.cpp's ``convert_hf_to_gguf.py --outtype f32`` (the
very weights lorakit computes with). The same MRs through the base alone (llama.cpp: the adapter's per-request
scale 0; lorakit: the adapter disabled) give the floor of the measure on each base and show that the adapter
changes the text.

    python convert_hf_to_gguf.py ~/.cache/lorakit/models/SmolLM2-135M-Instruct --outfile smollm2-f32.gguf \\
        --outtype f32   # llama.cpp's converter (pip install sentencepiece: its requirements)
    OMP_NUM_THREADS=1 python bench/gguf_export.py --adapter e2e-1500=RUN/seed0/adapter \\
        --adapter e2e-demo=RUN2/seed0/adapter --base f32=smollm2-f32.gguf [--max-examples 20] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

import torch
from transformers import AutoConfig

import lorakit
from lorakit.benchtools import write_record
from lorakit.export import export_gguf
from lorakit.generate import Decoding, generate_ids
from lorakit.models import resolve_model
from lorakit.tasks.lm import prompt_ids, read_e2e
from quant_quality import load_adapted
from serve import _free_port, running_process
from serve_gen import find_llama_server, smollm2_gguf


@contextlib.contextmanager
def llama_server(binary: str, base: Path, lora: Path):
    """llama.cpp's server, one slot, one thread, on loopback, with the adapter at scale 1; yields its URL."""
    port = _free_port()
    cmd = [binary, "-m", str(base), "--lora", str(lora), "--port", str(port), "--host", "127.0.0.1", "-np", "1",
           "-c", "1024", "-t", "1", "-tb", "1", "--no-webui"]
    # a binary copied from another build folder finds its shared libraries beside it
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(Path(binary).parent),
                                                                  os.environ.get("LD_LIBRARY_PATH")]))
    url = f"http://127.0.0.1:{port}"
    with running_process(cmd, f"{url}/health", "llama-server", timeout=120):
        yield url


def llama_complete(url: str, prompt: list[int], max_tokens: int, scale: float) -> list[int]:
    """Greedy completion token ids (EOS dropped) of ``prompt`` with the server's adapter at ``scale``."""
    body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "cache_prompt": False, "return_tokens": True,
            "lora": [{"id": 0, "scale": scale}]}
    request = urllib.request.Request(f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    if answer["tokens_evaluated"] != len(prompt):
        raise RuntimeError(f"llama-server evaluated {answer['tokens_evaluated']} prompt tokens, sent {len(prompt)}")
    return answer["tokens"]


def compare(ours: list[list[int]], theirs: list[list[int]], tokenizer) -> dict:
    """How many completions have the same text, and where the token lists first differ."""
    stop = {tokenizer.eos_token_id}
    ours = [[t for t in c if t not in stop] for c in ours]
    theirs = [[t for t in c if t not in stop] for c in theirs]
    texts = [(tokenizer.decode(a), tokenizer.decode(b)) for a, b in zip(ours, theirs)]
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) if a != b else None
             for a, b in zip(ours, theirs)]
    return {"same_text": sum(a == b for a, b in texts), "mrs": len(texts), "first_difference": first,
            "differing": [{"lorakit": a, "llamacpp": b} for a, b in texts if a != b]}


@torch.no_grad()
def margins(model, prompts: list[list[int]], ours: list[list[int]], theirs: list[list[int]],
            first: list[int | None]) -> list[float]:
    """At each first difference, lorakit's logit of its own token minus its logit of llama.cpp's (teacher-forced
    on the common prefix): how near a tie lorakit's choice was (1 logit: e^1 = 2.7x the probability)."""
    out = []
    for prompt, a, b, i in zip(prompts, ours, theirs, first):
        if i is None or i >= min(len(a), len(b)):
            continue
        logits = model(input_ids=torch.tensor([prompt + a[:i]])).logits[0, -1]
        out.append(round(float(logits[a[i]] - logits[b[i]]), 4))
    return out


def run_adapter(folder: str, binary: str, bases: dict[str, Path], max_examples: int, max_new_tokens: int,
                work: Path) -> dict:
    info, tokenizer, model = load_adapted(folder)
    mrs = list(dict.fromkeys(mr for mr, _ in read_e2e("test")))[:max_examples]
    prompts = [prompt_ids(tokenizer, mr, info.get("prompt_format", "plain"), info.get("prompt_separator", "\n"))
               for mr in mrs]
    lora = export_gguf(folder, work / "adapter.gguf", AutoConfig.from_pretrained(resolve_model(info["model"])))
    decoding = Decoding(max_new_tokens=max_new_tokens)

    def ours() -> list[list[int]]:
        return generate_ids(model, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                            decoding=decoding, batch_size=1)

    adapted = ours()
    with lorakit.disable_adapters(model):
        base_only = ours()
    result: dict = {"gguf_bytes": lora.stat().st_size, "mrs": mrs,
                    "adapter_changes_text": sum(tokenizer.decode(a) != tokenizer.decode(b)
                                                for a, b in zip(adapted, base_only))}
    for name, base in bases.items():
        with llama_server(binary, base, lora) as url:
            theirs = [llama_complete(url, p, max_new_tokens, 1.0) for p in prompts]
            theirs_base = [llama_complete(url, p, max_new_tokens, 0.0) for p in prompts]
        adapter = compare(adapted, theirs, tokenizer)
        adapter["logit_margins"] = margins(model, prompts, adapted, theirs, adapter["first_difference"])
        result[name] = {"adapter": adapter, "base": compare(base_only, theirs_base, tokenizer)}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", action="append", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--max-examples", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--llama-server", help="llama.cpp's llama-server (default: $LLAMA_SERVER, else the build here)")
    parser.add_argument("--base", action="append", default=[], metavar="NAME=GGUF",
                        help="more base GGUFs for llama.cpp beside the Q4_1 one (e.g. f32=smollm2-f32.gguf: the lorakit "
                             "folder through convert_hf_to_gguf.py --outtype f32, the very weights lorakit computes with)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    binary = find_llama_server(args.llama_server)
    if binary is None:
        sys.exit("no llama-server binary: run bench/build_llama_server.sh, or pass --llama-server")
    bases = {"q4_1": smollm2_gguf(), **{k: Path(v) for k, v in (b.split("=", 1) for b in args.base)}}
    config = {"adapters": dict(a.split("=", 1) for a in args.adapter), "max_examples": args.max_examples,
              "max_new_tokens": args.max_new_tokens, "llama_server": binary, "threads": 1,
              "base_ggufs": {k: str(v) for k, v in bases.items()}}
    results: dict = {}
    for name, folder in config["adapters"].items():
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = run_adapter(folder, binary, bases, args.max_examples, args.max_new_tokens, Path(tmp))
        for base in bases:
            r = results[name][base]
            print(f"{name}, llama.cpp on the {base} base: same greedy text {r['adapter']['same_text']}/"
                  f"{r['adapter']['mrs']} with the adapter (lorakit's logit margins where not: "
                  f"{r['adapter']['logit_margins']}), {r['base']['same_text']}/{r['base']['mrs']} base alone; "
                  f"the adapter changes {results[name]['adapter_changes_text']} of lorakit's texts", flush=True)
        print(f"wrote {write_record('gguf_export', config, results)}")


if __name__ == "__main__":
    main()
