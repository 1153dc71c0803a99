"""Write docs/BENCH.md from the records in bench/results/ (nothing typed in by hand).

    python bench/report.py [--results bench/results] [--out docs/BENCH.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ms(case: dict) -> str:
    return f"{1000 * case['median_s']:.0f}"


def train_step(r: dict) -> list[str]:
    rows = ["| model / dropout / precision | lorakit ms | lorakit fast ms | PEFT ms | full ms | lorakit/PEFT | "
            "fast/PEFT | LoRA/full (lorakit) | fast/full | trainer bf16/fp32 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in r["results"].items():
        c, q = v["cases"], v["ratios"]
        fast = _ms(c["lorakit_fast"]) if "lorakit_fast" in c else "—"
        rows.append(f"| {key} | {_ms(c['lorakit'])} | {fast} | {_ms(c['peft'])} | {_ms(c['full'])} | "
                    f"{q['lorakit/peft']:.3f} | {_ratio(q, 'lorakit_fast/peft')} | {q['lorakit/full']:.3f} | "
                    f"{_ratio(q, 'lorakit_fast/full')} | {_ratio(q, 'trainer bf16/fp32')} |")
    return rows


def _ratio(ratios: dict, key: str) -> str:
    return f"{ratios[key]:.3f}" if key in ratios else "—"


def memory(r: dict) -> list[str]:
    res = r["results"]
    rows = ["| case | peak RSS MB | ratio to full |", "|---|---|---|"]
    for case, v in res["cases"].items():
        ratio = res["ratios"].get(f"{case}/full", 1.0)
        rows.append(f"| {case} | {v['peak_rss_mb']:.0f} | {ratio:.3f} |")
    return rows


def latency(r: dict) -> list[str]:
    rows = ["| batch | case | median ms | overhead vs base |", "|---|---|---|---|"]
    for batch, v in r["results"].items():
        for case, c in v["cases"].items():
            over = v["overhead_vs_base"].get(case)
            rows.append(f"| {batch} | {case} | {_ms(c)} | {'—' if over is None else f'{100 * over:+.1f}%'} |")
    return rows


def scaling(r: dict) -> list[str]:
    res = r["results"]
    rank = res["rank"]
    ref = next(k for k in rank if k.startswith("ratio_to_"))
    rows = ["| rank | ms/step | ratio to r=8 |", "|---|---|---|"]
    rows += [f"| {k} | {_ms(c)} | {rank[ref][k]:.3f} |" for k, c in rank["cases"].items()]
    rows += ["", "| sequence | lorakit ms | PEFT ms | lorakit/PEFT |", "|---|---|---|---|"]
    rows += [f"| {k} | {_ms(v['cases']['lorakit'])} | {_ms(v['cases']['peft'])} | {v['lorakit/peft']:.3f} |"
             for k, v in res["length"].items()]
    rows += ["", "| merged inference | ms | ratio to base |", "|---|---|---|"]
    rows += [f"| {k} | {_ms(c)} | {res['adapters']['ratio_to_base'][k]:.3f} |" for k, c in res["adapters"]["cases"].items()]
    return rows


def files(r: dict) -> list[str]:
    rows = ["| model | trainable params | adapter MB | full model MB | full / adapter |", "|---|---|---|---|---|"]
    rows += [f"| {k} | {v['trainable_params']:,} | {v['adapter_bytes'] / 1e6:.2f} | {v['full_model_bytes'] / 1e6:.0f} | "
             f"{v['ratio']:,.0f}x |" for k, v in r["results"].items()]
    return rows


def e2e(r: dict) -> list[str]:
    res = r["results"]
    rows = ["| runner | wall s | best dev |", "|---|---|---|"]
    for name in ("lorakit", "peft_loop"):
        best = ", ".join(f"{k} {100 * v:.2f}" for k, v in res[name]["best"].items())
        rows.append(f"| {name} | {res[name]['wall_seconds']:.0f} | {best} |")
    rows.append(f"\nwall-time ratio lorakit / PEFT loop: **{res['wall_ratio']:.3f}**; "
                f"median epoch-time ratio: {res['epoch_time_ratio']:.3f} ({r['config']['epochs']} epochs)")
    return rows


def mixed(r: dict) -> list[str]:
    res = r["results"]
    rows = ["| case | rows/s |", "|---|---|"]
    rows += [f"| {case} | {v:.0f} |" for case, v in res["rows_per_second"].items()]
    rows += ["", "| throughput ratio | value |", "|---|---|"]
    rows += [f"| {k} | {v:.3f} |" for k, v in res["throughput_ratios"].items()]
    return rows


def serve(r: dict) -> list[str]:
    rows = ["| clients | case | rows/s | p50 ms | p99 ms | failed |", "|---|---|---|---|---|---|"]
    for clients, v in r["results"].items():
        rows += [f"| {clients.split('_')[1]} | {case} | {c['rows_per_s']:.0f} | {c['p50_ms']:.0f} | {c['p99_ms']:.0f} | "
                 f"{c['failed']} |" for case, c in v["cases"].items()]
    rows += ["", "| clients | spread / one | spread / spread_nobatch |", "|---|---|---|"]
    rows += [f"| {clients.split('_')[1]} | {v['ratios']['spread/one']:.3f} | {v['ratios']['spread/spread_nobatch']:.3f} |"
             for clients, v in r["results"].items()]
    return rows


def serve_gen(r: dict) -> list[str]:
    res, cfg = r["results"], r["config"]
    off = res["offline"]
    rows = [f"model: {cfg['model']}, {cfg['adapters']} adapters r={cfg['r']} q/v, {cfg['max_tokens']} new tokens per "
            f"request (greedy, ignore_eos), server precision {cfg['precision']}, {cfg['seconds']} s x {cfg['rounds']} "
            f"rounds per case, CPU flags {', '.join(cfg['cpu_flags'])}"
            + (f", llama-server build {cfg['llama_server_build']}" if cfg.get("llama_server_build") else ""), "",
            "| clients | case | tokens/s | TTFT p50 ms | TTFT p99 ms | per token p50 ms | per token p99 ms | failed |",
            "|---|---|---|---|---|---|---|---|"]
    for clients, v in res.items():
        if clients.startswith("clients_"):
            rows += [f"| {clients.split('_')[1]} | {case} | {c['tokens_per_s']:.1f} | {c['ttft_p50_ms']:.0f} | "
                     f"{c['ttft_p99_ms']:.0f} | {c['per_token_p50_ms']:.1f} | {c['per_token_p99_ms']:.1f} | {c['failed']} |"
                     for case, c in v["cases"].items()]
    names = sorted({k for c, v in res.items() if c.startswith("clients_") for k in v["ratios"]})
    rows += ["", "| clients | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows += [f"| {c.split('_')[1]} | " + " | ".join(_ratio(v["ratios"], k) for k in names) + " |"
             for c, v in res.items() if c.startswith("clients_")]
    ours, peft = off["cases"]["lorakit"], off["cases"]["peft"]

    def ms(c: dict) -> str:  # records before #27 hold no ms per token
        return f" ({c['ms_per_token']:.1f} ms per token)" if "ms_per_token" in c else ""

    rows += _anchor_check(res.get("llamacpp_lora_check"), cfg)
    rows += ["", f"Offline, one batch of {cfg['adapters']} prompts over {cfg['adapters']} adapters, fp32: lorakit scheduler "
             f"{ours['tokens_per_s']:.0f} tokens/s{ms(ours)}, PEFT `generate(adapter_names=...)` "
             f"{peft['tokens_per_s']:.0f} tokens/s{ms(peft)} (ratio {off['lorakit/peft tokens/s']:.3f}); greedy "
             f"completions identical for {off['identical_completions']} of {cfg['adapters']}."]
    return rows


def prefix_cache(r: dict) -> list[str]:
    res, cfg = r["results"], r["config"]
    rows = [f"model: {cfg['model']}, adapters r={cfg['r']} q/v, {cfg['clients']} closed-loop clients (client i names "
            f"adapter a(i mod A)), prompts: a {cfg['system_tokens']}-token system prompt + an E2E dev MR (SmolLM2's chat "
            f"template), {cfg['max_tokens']} new tokens (greedy, ignore_eos), server precision {cfg['precision']}, "
            f"{cfg['seconds']} s x {cfg['rounds']} rounds per case, CPU flags {', '.join(cfg['cpu_flags'])}; greedy "
            f"completions identical with and without the cache: {res['identical_completions']} of {cfg['check']}", "",
            "| adapters | prefix cache | tokens/s | TTFT p50 ms | TTFT p99 ms | per token p50 ms | failed | hit rate |",
            "|---|---|---|---|---|---|---|---|"]
    for key, v in res.items():
        if key.startswith("adapters_"):
            hits = {"on": f"{v['hit_rate']:.3f}", "off": "—"}
            rows += [f"| {key.split('_')[1]} | {case} | {c['tokens_per_s']:.1f} | {c['ttft_p50_ms']:.0f} | "
                     f"{c['ttft_p99_ms']:.0f} | {c['per_token_p50_ms']:.1f} | {c['failed']} | {hits[case]} |"
                     for case, c in v["cases"].items()]
    rows += ["", "| adapters | TTFT p50 off / on | tokens/s on / off |", "|---|---|---|"]
    rows += [f"| {k.split('_')[1]} | {v['ratios']['ttft_p50 off/on']:.2f} | {v['ratios']['tokens/s on/off']:.2f} |"
             for k, v in res.items() if k.startswith("adapters_")]
    return rows


def _anchor_check(check: dict | None, cfg: dict) -> list[str]:
    """How ``llamacpp-lora`` was served, and the check that it applies the adapters lorakit does (#29 item 6)."""
    if not check:
        return []
    n = check["prompts"]
    against = [f"`{case}`: {c['same_text_adapted']} / {n} with the adapter ({c['same_text_where_adapter_changes_lorakit']}"
               f" of the {c['adapter_changes_lorakit_text']} its adapter changes), {c['same_text_base']} / {n} base alone"
               for case, c in check["against"].items()]
    return ["", f"`llamacpp-lora`: llama-server, {cfg['llama_server_slots']} slots (as `llamacpp`), with the "
            f"{cfg['adapters']} adapters exported by `lorakit export gguf` (`--lora a0.gguf ... "
            f"--lora-init-without-apply`); request i names a{{i mod {cfg['adapters']}}} in its `lora` field "
            "(`cache_prompt: false`: llama.cpp's prompt cache is not keyed by adapter, and would hand a request KV "
            "computed under another). llama.cpp decodes together only the slots with the same adapters. Check, "
            f"{n} prompts each through its own adapter, greedy, {check['max_tokens']} tokens: the adapter changes "
            f"{check['adapter_changes_llamacpp_text']} / {n} of llama.cpp's texts; llama.cpp's text is lorakit's on "
            + "; ".join(against) + " (base alone: the floor, other kernels; `int4` holds the Q4_1 blocks llama.cpp "
            "computes with)."]


def _ratio_rows(ratios: dict[str, float]) -> list[str]:
    return ["", "| ratio | value |", "|---|---|", *[f"| {k} | {v:.3f} |" for k, v in ratios.items()]]


def lm_step(r: dict) -> list[str]:
    res = r["results"]
    rows = [f"model: {r['config']['model']}", "", "| case | median ms/step | tokens/s |", "|---|---|---|"]
    rows += [f"| {k} | {_ms(c)} | {res['tokens_per_s'][k]:.0f} |" for k, c in res["cases"].items()]
    rows += _ratio_rows(res["ratios"])
    return rows


def lm_memory(r: dict) -> list[str]:
    res = r["results"]
    rows = [f"model: {r['config']['model']}, {r['config']['steps']} steps", "",
            "| case | RSS after loading MB | peak RSS in training MB | increase MB |", "|---|---|---|---|"]
    rows += [f"| {k} | {c['loaded_rss_mb']:.0f} | {c['train_peak_rss_mb']:.0f} | {c['train_increase_mb']:.0f} |"
             for k, c in res["cases"].items()]
    rows += _ratio_rows(res["ratios"])
    return rows


def fsdp_memory(r: dict) -> list[str]:
    res, cfg = r["results"], r["config"]
    hidden, layers, inter, vocab, heads, kv = cfg["dims"]
    rows = [f"{cfg['shape']} shape (hidden {hidden}, {layers} layers, intermediate {inter}, vocab {vocab}, {heads} heads, "
            f"{kv} kv heads, tied), random weights, {cfg['processes']} processes ({cfg['backend']}), r={cfg['r']} "
            f"{cfg['targets']}, batch {cfg['batch']} x {cfg['seq']} per process, gradient checkpointing, "
            f"{cfg['steps']} steps (the first untimed):", "",
            "| engine | peak RSS after building MB | peak RSS MB | build s | median step s |", "|---|---|---|---|---|"]
    for engine, e in res["engines"].items():
        rows.append(f"| {engine} | {e['built_peak_rss_mb']:.0f} | {e['peak_rss_mb']:.0f} | "
                    f"{max(x['build_s'] for x in e['ranks']):.0f} | {e['median_step_s']:.1f} |")
    return rows + _ratio_rows(res["ratios"])


def generation(r: dict) -> list[str]:
    res = r["results"]
    rows = [f"model: {r['config']['model']}, {r['config']['new_tokens']} new tokens", "",
            "| case | median ms/token | tokens/s | ratio to base |", "|---|---|---|---|"]
    rows += [f"| {k} | {c['median_ms_per_token']:.1f} | {c['tokens_per_s']:.1f} | "
             f"{_ratio(res['ratios_to_base'], k) if k != 'base' else '1'} |" for k, c in res["cases"].items()]
    return rows


def dora(r: dict) -> list[str]:
    rows = ["| targets | lorakit LoRA ms | lorakit DoRA ms | PEFT LoRA ms | PEFT DoRA ms | DoRA/LoRA lorakit | "
            "DoRA/LoRA PEFT | DoRA lorakit/PEFT |", "|---|---|---|---|---|---|---|---|"]
    for key, v in r["results"].items():
        c, q = v["cases"], v["ratios"]
        rows.append(f"| {key} | {_ms(c['lorakit_lora'])} | {_ms(c['lorakit_dora'])} | {_ms(c['peft_lora'])} | "
                    f"{_ms(c['peft_dora'])} | {q['lorakit_dora/lorakit_lora']:.3f} | {q['peft_dora/peft_lora']:.3f} | "
                    f"{q['lorakit_dora/peft_dora']:.3f} |")
    return rows


def packing(r: dict) -> list[str]:
    cfg = r["config"]
    rows = [f"model: {cfg['model']}, {cfg['precision']}, {cfg['rounds']} interleaved rounds per data set (after one "
            "untimed round), each case's round about as many rows", "",
            "| data | max length | rows | packed sequences | case | batch | steps per round | rows / computed tokens | "
            "row tokens/s (median of rounds) | row tokens/s (all rounds) |", "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = {}
    for key, v in r["results"].items():
        for case, c in v["cases"].items():
            rows.append(f"| {key} | {cfg['datasets'][key]['max_length']} | {v['rows']:,} | {v['sequences']:,} | {case} | "
                        f"{v['batch_sizes'][case]} | {v['steps_per_round'][case]} | "
                        f"{v['row_share_of_computed_tokens'][case]:.3f} | {c['median_tokens_per_s']:.0f} | "
                        f"{v['tokens_per_s'][case]:.0f} |")
        ratios.update({f"{key}: {k} (median of rounds)": x for k, x in v["ratios"].items()})
        ratios.update({f"{key}: {k} (all rounds)": x for k, x in v["ratios_of_totals"].items()})
    return rows + _ratio_rows(ratios)


def padding(r: dict) -> list[str]:
    res = r["results"]
    rows = [f"model: {r['config']['model']}, {r['config']['epochs']} epochs of MRPC, each variant in its own process "
            "(one thread), side by side", "",
            "| pad to | epoch | seconds | RSS MB | heap in use MB | heap free MB | free chunks |",
            "|---|---|---|---|---|---|---|"]
    for name, v in res.items():
        rows += [f"| {name.split('=')[1]} | {e['epoch']} | {e['seconds']:.0f} | {e['rss_mb']} | {e.get('heap_in_use_mb', '—')} | "
                 f"{e.get('heap_free_mb', '—')} | {e.get('free_chunks', '—')} |" for e in v["epochs"]]
    ratios = {f"{name}: {k}": x for name, v in res.items() for k, x in v.items() if " / " in k}
    return rows + _ratio_rows(ratios)


def qlora(r: dict) -> list[str]:
    res = r["results"]
    rows = ["Peak RSS, each case in its own process (build the model, a warm-up step, timed steps); allocator: "
            "glibc's mmap threshold capped (`lorakit train`) or glibc's default:", "",
            "| model | case | allocator | build s | RSS after building MB | peak RSS MB | step s |",
            "|---|---|---|---|---|---|---|"]
    for model, cases in (res["memory"] or {}).items():
        rows += [f"| {model} | {k} | {c.get('allocator', 'default')} | {c['build_s']:.0f} | {c['loaded_rss_mb']:.0f} | "
                 f"{c['peak_rss_mb']:.0f} | {c['step_s']:.1f} |" for k, c in cases.items() if k != "ratios"]
        rows += [f"| {model} | {k} | | | | {v:.3f} | |" for k, v in cases.get("ratios", {}).items()]
    rows += ["", "Step time, the cases of one model side by side (medians of interleaved rounds):", "",
             "| model | batch | lorakit nf4 ms | PEFT nf4 ms | lorakit fp32 ms | lorakit/PEFT | lorakit/fp32 | PEFT/fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for model, v in (res["speed"] or {}).items():
        c, q = v["cases"], v["ratios"]
        rows.append(f"| {model} | {' x '.join(map(str, v['batch']))} | {_ms(c['lorakit'])} | {_ms(c['peft'])} | "
                    f"{_ms(c['fp32'])} | {q['lorakit/peft']:.3f} | {q['lorakit/fp32']:.3f} | {q['peft/fp32']:.3f} |")
    return rows


KERNEL_COLUMNS = ("fp32", "bf16 (bf16 x)", "int8pack (bf16 x)", "int4pack (bf16 x)", "fbgemm dynamic int8", "q8_0@avx2",
                  "q4_1@avx2", "q8_0@avx512", "q4_1@avx512", "q4_0@avx512")


def kernels(r: dict) -> list[str]:
    res = r["results"]
    rows = []
    if res.get("matrices"):
        cols = [c for c in KERNEL_COLUMNS if any(m["case"] == c for m in res["matrices"])]
        rows += ["One matrix (it stays in the cache between calls), ms per product (all cases: the JSON record):", "",
                 "| shape | rows | threads | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
        keys = dict.fromkeys((m["shape"], m["rows"], m["threads"]) for m in res["matrices"])
        for key in keys:
            ms = {m["case"]: m["ms"] for m in res["matrices"] if (m["shape"], m["rows"], m["threads"]) == key}
            rows.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(f"{ms[c]:.3f}" for c in cols) + " |")
    if res.get("decode_step"):
        rows += ["", *_decode_step_rows(res["decode_step"])]
    if res.get("model"):
        model = res["model"]
        rows += ["", f"{Path(model['model']).name} through transformers' generate, batch 1, {model['threads']} thread, "
                 f"{model['prompts']} E2E MRs x {model['new_tokens']} greedy tokens:", "",
                 "| weights | ms/token | top-1 agreement (teacher-forced) | identical greedy tokens |", "|---|---|---|---|"]
        rows += [f"| {k} | {c['ms_per_token']:.1f} | {c['teacher_forced_top1']:.3f} | {c['identical_tokens']:.3f} |"
                 for k, c in model["cases"].items()]
    return rows


def _decode_step_rows(step: dict) -> list[str]:
    cases = step["cases"]
    if not all("rows" in c for c in cases.values()):  # records before the per-rows step: one row, a case per line
        return [f"One decoding step's {step['matrices']} matrices at batch 1, read from memory:", "",
                "| case | ms | weight GB/s | / fp32 |", "|---|---|---|---|",
                *(f"| {k} | {c['ms']:.2f} | {c['weight_gb_s']:.1f} | {c['vs_fp32']:.3f} |" for k, c in cases.items())]
    cols = list(dict.fromkeys(c["case"] for c in cases.values()))
    out = [f"One decoding step's {step['matrices']} matrices (weights read from memory), rows of x at a time (a batched "
           "step), ms (and / fp32, the median ratio over interleaved rounds); load average before-after each round; "
           "the bf16 / int8pack / int4pack kernels at 1 row only:", "",
           "| rows | threads | load | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for key in dict.fromkeys((c["rows"], c["threads"]) for c in cases.values()):
        here = {c["case"]: c for c in cases.values() if (c["rows"], c["threads"]) == key}
        load = next(iter(here.values()))["load"]
        cells = [f"{here[c]['ms']:.2f} ({here[c]['vs_fp32']:.2f})" if c in here else "" for c in cols]
        out.append(f"| {key[0]} | {key[1]} | {load[0]:.1f}-{load[1]:.1f} | " + " | ".join(cells) + " |")
    return out


def _flags(r: dict) -> str:
    hardware = r["config"].get("hardware", {})
    return f"CPU flags: {', '.join(hardware.get('cpu_flags', [])) or 'none of avx2 / avx512 / amx'}."


def engine_design(r: dict) -> list[str]:
    rows = [f"{_flags(r)} Tokens/s = rows x steps / median call time over interleaved rounds; model/decoder: median "
            "over rounds of the per-round time ratio (below 1: ModelDecoder faster).", "",
            "| dtype | rows | Decoder tok/s | ModelDecoder tok/s | model/decoder time | greedy agreement | load average |",
            "|---|---|---|---|---|---|---|"]
    for dtype, by_rows in r["results"].items():
        if dtype == "profile":
            continue
        for R, v in by_rows.items():
            tps, load = v["tokens_per_s"], v.get("load_average")
            rows.append(f"| {dtype} | {R} | {tps['decoder']:.1f} | {tps['model']:.1f} | {v['model_over_decoder_time']:.3f} | "
                        f"{v['token_agreement']:.3f} | {'—' if load is None else f'{load[0]:.1f} → {load[1]:.1f}'} |")
    return rows


def engine_design_compiled(r: dict) -> list[str]:
    rows = [f"{_flags(r)} {r['config'].get('threads', 1)} thread(s). ModelDecoder uncompiled vs compiled "
            "(`LORAKIT_COMPILE=1`), rows x steps / median call time over interleaved rounds; compiled/model: median "
            "over rounds of the per-round time ratio (below 1: compiled faster). Greedy tokens equal.", "",
            "| dtype | rows | ModelDecoder tok/s | compiled tok/s | compiled/model time | load average |",
            "|---|---|---|---|---|---|"]
    for dtype, by_rows in r["results"].items():
        for R, v in by_rows.items():
            tps, load = v["tokens_per_s"], v["load_average"]
            rows.append(f"| {dtype} | {R} | {tps['model']:.1f} | {tps['model compiled']:.1f} | "
                        f"{v['compiled_over_model_time']:.3f} | {load[0]:.1f} → {load[1]:.1f} |")
    return rows


def cb_design(r: dict) -> list[str]:
    cfg = r["config"]
    rows = [f"{_flags(r)} {cfg['threads']} thread(s), {cfg['new_tokens']} new tokens per prompt, prefill included, base "
            "model (transformers' batching has no per-request adapter); tokens/s = R x new tokens / median call time "
            "over interleaved rounds.", "",
            "| prompts R | lorakit scheduler (model engine) tok/s | transformers generate_batch tok/s | "
            "transformers / lorakit time | greedy agreement | load average |", "|---|---|---|---|---|---|"]
    for R, v in r["results"].items():
        tps, load = v["tokens_per_s"], v["load_average"]
        rows.append(f"| {R} | {tps['lorakit']:.1f} | {tps['transformers_cb']:.1f} | {v['cb_over_lorakit_time']:.2f} | "
                    f"{v['token_agreement']:.3f} | {load[0]:.1f} → {load[1]:.1f} |")
    return rows


def decode_step(r: dict) -> list[str]:
    res = r["results"]
    bw, load = res["bandwidth_gb_s"], res["load_average"]
    rows = [f"{_flags(r)} Bandwidth in the same rounds: GEMV {bw['gemv']:.1f} GB/s, memcpy {bw['memcpy']:.1f} GB/s "
            f"(the floor takes the faster); load average {load['before'][0]:.1f} → {load['after'][0]:.1f}.", "",
            "| weights | ms/token | CPU ms/token | weights read MB | floor ms | ms/token / floor | KV cache read MB |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| {fmt} | {f['ms_per_token']:.1f} | {f['cpu_ms_per_token']:.1f} | {f['weight_mb']:.0f} | "
             f"{f['floor_ms']:.1f} | {f['over_floor']:.2f} | {f['kv_cache_mb']:.1f} |" for fmt, f in res["formats"].items()]
    threads, compiled = r["config"].get("threads", 1), {k: f["compile_s"] for k, f in res["formats"].items()
                                                        if f.get("compile_s") is not None}
    rows += ["", f"{threads} thread(s). \"compiled\": ModelDecoder(compile=True) (`LORAKIT_COMPILE=1`), same rounds; "
             "first prefill + 3 decode steps (the compilation, inductor's cache as found): "
             + (", ".join(f"{k} {v:.0f} s" for k, v in compiled.items()) or "not run") + "."]
    return rows


def _e2e_scores(scores: dict | None) -> str:
    """The five E2E metrics as table cells, BLEU, METEOR and ROUGE_L in points."""
    scale = {"BLEU": 100, "NIST": 1, "METEOR": 100, "ROUGE_L": 100, "CIDEr": 1}
    return " | ".join("—" if scores is None or scores.get(k) is None else f"{x * scores[k]:.2f}" for k, x in scale.items())


def quant_quality(r: dict) -> list[str]:
    cfg, res = r["config"], r["results"]["adapters"]
    rows = [f"{cfg['max_examples']} E2E test MRs per adapter; agreement: teacher-forced top-1 on the fp32 greedy "
            f"completion (max {cfg['max_new_tokens']} tokens + EOS); BLEU: beam {cfg['bleu_decoding']['num_beams']}, "
            "length penalty 0.9, no repeated 4-grams; int8 = q8_0, int4 = q4_1 with a q8_0 LM head, adapters in "
            "float32, float32 activations", "",
            "| adapter | weights | top-1 agreement | tokens | MRs all agreeing | BLEU | NIST | METEOR | ROUGE_L | CIDEr "
            "| BLEU - fp32 (points) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for adapter, v in res.items():
        for case, a in v["agreement"].items():
            scores = _e2e_scores(v.get("bleu", {}).get(case))
            diff = v.get("bleu_diff_points", {}).get(case)
            rows.append(f"| {adapter} | {case} | {a['top1']:.4f} | {a['tokens']} | {a['mrs_all_agree']} / {v['mrs']} | "
                        f"{scores} | {'—' if diff is None else f'{diff:+.2f}'} |")
    return rows


def gguf_export(r: dict) -> list[str]:
    cfg, res = r["config"], r["results"]
    rows = [f"{cfg['max_examples']} E2E test MRs per adapter, greedy, at most {cfg['max_new_tokens']} tokens: lorakit "
            "(float32, the adapter as trained) against `llama-server -t 1 --lora adapter.gguf` (`lorakit export gguf`) on "
            "each base GGUF (q4_1: the file lorakit's SmolLM2 folder was dequantized from; f32: that folder through "
            "`convert_hf_to_gguf.py --outtype f32`). Base alone: the same MRs with the adapter off on both sides. "
            "Margin: lorakit's logit of its token minus its logit of llama.cpp's, where they first differ", "",
            "| adapter | llama.cpp base | same text, adapter | same text, base alone | margins at the first difference |",
            "|---|---|---|---|---|"]
    for adapter, v in res.items():
        for base in cfg["base_ggufs"]:
            a, b = v[base]["adapter"], v[base]["base"]
            rows.append(f"| {adapter} | {base} | {a['same_text']} / {a['mrs']} | {b['same_text']} / {b['mrs']} | "
                        f"{', '.join(f'{m:.3f}' for m in a['logit_margins']) or '—'} |")
    return rows


SECTIONS = [("train_step", "Training step (batch 16 x 128, forward + backward + AdamW)", train_step),
            ("memory", "Peak memory of training (each case in its own process)", memory),
            ("latency", "Inference latency, GPT-2 medium shape (paper Table 1 style)", latency),
            ("scaling", "Scaling with rank, sequence length and adapters loaded (MiniLM)", scaling),
            ("files", "Checkpoint size", files),
            ("mixed", "Mixed-adapter batch, 64 rows x 64 tokens, MiniLM r=8 q/v, inference", mixed),
            ("serve", "lorakit serve load test, MiniLM, 32 adapters r=8 q/v, 1 sentence pair per request, fp32", serve),
            ("serve_bf16", "lorakit serve load test, as above with --precision bf16", serve),
            ("e2e", "End to end: the demo recipe, lorakit train vs a plain PEFT loop", e2e),
            ("lm_step", "Causal-LM training step on real E2E batches of 8, r=4 q/v, label smoothing 0.1 "
             "(lorakit train vs a PEFT user's step)", lm_step),
            ("lm_memory", "Causal-LM training peak memory, as above, each case in its own process", lm_memory),
            ("fsdp_memory", "FSDP against DDP for a causal LM (#28): peak RSS per process (the larger of 2)", fsdp_memory),
            ("generation", "Generation latency, batch 1, greedy, fixed new tokens, E2E dev prompts", generation),
            ("serve_gen", "lorakit serve with a causal LM: OpenAI completions, continuous batching over adapters",
             serve_gen),
            ("prefix_cache", "Prefix caching in lorakit serve (#29 item 3): a shared system prompt, SmolLM2-135M",
             prefix_cache),
            ("padding", "A long training process: batches padded to the longest row or to a multiple of 8", padding),
            ("packing", "lorakit train --packing against unpacked batches (#28): row tokens per second of the "
             "training step, SmolLM2-135M, E2E demo recipe", packing),
            ("qlora", "QLoRA: a LoRA step (r=16 q,k,v,o, 1 x 128, gradient checkpointing) on a bitsandbytes nf4 base",
             qlora),
            ("dora", "DoRA training step, SmolLM2-135M shape (random weights), batch 8 x 128, r=8, fp32 "
             "(forward + backward + AdamW)", dora),
            ("kernels", "Weight-only quantized linear kernels (q8_0 / q4_1 / q4_0 blocks) against the stock ones, "
             "SmolLM2-135M's shapes", kernels),
            ("engine_design", "Decoding engines (#33): lean Decoder vs ModelDecoder (the model's own modules), "
             "SmolLM2-135M, 8 r=4 q/v adapters, a row per adapter, greedy", engine_design),
            ("engine_design_compiled", "ModelDecoder compiled (#27 item 3), SmolLM2-135M, 8 r=4 q/v adapters, a row "
             "per adapter, greedy", engine_design_compiled),
            ("cb_design", "Decoding engines (#33): transformers' own continuous batching vs lorakit's scheduler, "
             "SmolLM2-135M, fp32", cb_design),
            ("decode_step", "Single-stream decoding against the weight-bandwidth floor (#27): ModelDecoder, "
             "SmolLM2-135M, 8 r=4 q/v adapters", decode_step),
            ("decode_step_2threads", "Single-stream decoding against the weight-bandwidth floor (#27), 2 threads",
             decode_step),
            ("quant_quality", "Quality of quantized decoding: int8 / int4 weights against fp32, SmolLM2-135M E2E "
             "adapters", quant_quality),
            ("gguf_export", "lorakit export gguf against llama.cpp: llama-server --lora, greedy E2E text, SmolLM2-135M",
             gguf_export)]
# Records written by a script run with flags (default: bench/<record>.py).
COMMANDS = {"serve_bf16": "serve.py --precision bf16", "decode_step": "decode_step.py --compile",
            "decode_step_2threads": "decode_step.py --compile --threads 2",
            "engine_design_compiled": "engine_design.py --compile --dtypes int8 q4_1", "lm_memory": "lm_step.py --memory",
            "kernels": "quant_kernels.py", "cb_design": "cb_design.py --repeats 3",
            "serve_gen": "serve_gen.py --seconds 15 --rounds 2 --llama-server PATH",
            "prefix_cache": "prefix_cache.py --seconds 20 --rounds 3",
            "quant_quality": "quant_quality.py --adapter e2e-1500=RUN/adapter --adapter e2e-demo=RUN/adapter",
            "gguf_export": "gguf_export.py --adapter e2e-1500=RUN/adapter --adapter e2e-demo=RUN/adapter "
                           "--base f32=smollm2-f32.gguf"}


# Targets of issues #5 and #8: (label, record, path to the measured ratio, (comparison, bound) or None).
TARGETS = [
    ("MiniLM step, dropout 0.1, fp32: lorakit train's step / PEFT", "train_step",
     ("minilm/dropout=0.1/fp32", "ratios", "lorakit_fast/peft"), ("<=", 0.40)),
    ("RoBERTa-base step, dropout 0.1, fp32: lorakit train's step / PEFT", "train_step",
     ("roberta-base/dropout=0.1/fp32", "ratios", "lorakit_fast/peft"), ("<=", 0.40)),
    ("MiniLM step, no dropout, fp32: lorakit / PEFT", "train_step",
     ("minilm/dropout=0.0/fp32", "ratios", "lorakit/peft"), ("<=", 0.90)),
    ("RoBERTa-base step, no dropout, fp32: lorakit / PEFT", "train_step",
     ("roberta-base/dropout=0.0/fp32", "ratios", "lorakit/peft"), ("<=", 0.90)),
    ("RoBERTa-base step, dropout 0.1: LoRA (lorakit train) / full", "train_step",
     ("roberta-base/dropout=0.1/fp32", "ratios", "lorakit_fast/full"), ("<=", 0.45)),
    ("RoBERTa-base peak memory: LoRA (lorakit train) / full", "memory", ("ratios", "lorakit_fast/full"), ("<=", 0.50)),
    ("Demo recipe wall time: lorakit train / PEFT loop", "e2e", ("wall_ratio",), ("<=", 0.40)),
    ("Mixed batch over 64 adapters: throughput / one adapter (issue #8)", "mixed",
     ("throughput_ratios", "rows_64/single"), (">=", 0.95)),
    ("Mixed batch over 64 adapters: throughput lorakit / PEFT adapter_names", "mixed",
     ("throughput_ratios", "rows_64/peft_rows_64"), (">=", 1.15)),
    ("Server, 32 clients over 32 adapters: rows/s / all on one adapter", "serve",
     ("clients_32", "ratios", "spread/one"), (">=", 0.90)),
    ("Server, 32 clients over 32 adapters: rows/s / same server without batching", "serve",
     ("clients_32", "ratios", "spread/spread_nobatch"), (">=", 3.0)),
    ("MiniLM step, dropout 0.1: --precision bf16 / fp32 (reported, no target)", "train_step",
     ("minilm/dropout=0.1/fp32", "ratios", "trainer bf16/fp32"), None),
    # Causal-LM task family (E2E on SmolLM2) and the paper's Table 1 claim on real decoding.
    ("Causal-LM train step lorakit / PEFT (fp32)", "lm_step", ("ratios", "lorakit/peft"), ("<=", 0.75)),
    ("Causal-LM train step lorakit bf16 / PEFT fp32 (reported, no target)", "lm_step",
     ("ratios", "lorakit_bf16/peft"), None),
    ("Causal-LM peak memory lorakit / PEFT", "lm_memory", ("ratios", "lorakit/peft"), ("<=", 0.70)),
    ("Causal-LM peak memory lorakit --gradient-checkpointing / PEFT", "lm_memory", ("ratios", "lorakit_ckpt/peft"),
     ("<=", 0.70)),
    ("Causal-LM train step lorakit --gradient-checkpointing / PEFT (reported, no target)", "lm_step",
     ("ratios", "lorakit_ckpt/peft"), None),
    ("Merged LoRA generation latency / base, batch 1", "generation", ("ratios_to_base", "merged"), ("<=", 1.01)),
    # Issue #16: the generation server (SmolLM2-135M, 32 adapters r=4 q/v).
    ("Generation server, 32 clients over 32 adapters: tokens/s / all on one adapter", "serve_gen",
     ("clients_32", "ratios", "spread/one"), (">=", 0.90)),
    ("Generation server, 32 clients: tokens/s / same server without batching", "serve_gen",
     ("clients_32", "ratios", "spread/nobatch"), (">=", 4.0)),
    ("Scheduler / PEFT generate(adapter_names), 32 prompts over 32 adapters (fp32)", "serve_gen",
     ("offline", "lorakit/peft tokens/s"), (">=", 1.3)),
    ("Generation server, 32 clients: tokens/s / llama.cpp llama-server -np 32", "serve_gen",
     ("clients_32", "ratios", "spread/llamacpp"), (">=", 1.0)),
    ("Generation server --quantize int8, 32 clients: tokens/s / llama.cpp", "serve_gen",
     ("clients_32", "ratios", "int8/llamacpp"), (">=", 1.0)),
    ("Single stream (1 client): tokens/s / llama.cpp", "serve_gen", ("clients_1", "ratios", "spread/llamacpp"),
     (">=", 0.5)),
    ("Single stream --quantize int8: tokens/s / llama.cpp", "serve_gen", ("clients_1", "ratios", "int8/llamacpp"),
     (">=", 0.5)),
    # Issue #27: quantized decoding against llama.cpp serving the base alone (its best case), same run.
    ("#27 single stream --quantize int4 --compile: tokens/s / llama.cpp", "serve_gen",
     ("clients_1", "ratios", "int4-compiled/llamacpp"), (">=", 0.7)),
    ("#27 single stream --quantize int4: tokens/s / llama.cpp", "serve_gen",
     ("clients_1", "ratios", "int4/llamacpp"), (">=", 0.7)),
    *[(f"#27 {c} clients over 32 adapters --quantize {q}: tokens/s / llama.cpp", "serve_gen",
       (f"clients_{c}", "ratios", f"{q}/llamacpp"), (">=", 1.0)) for c in (8, 32) for q in ("int4", "int8")],
    # Issue #29 item 3: prefix caching, 32 clients sharing a ~300-token system prompt, cache on against off.
    *[(f"#29 prefix cache, 32 clients over {a} adapter(s): TTFT p50 off / on", "prefix_cache",
       (f"adapters_{a}", "ratios", "ttft_p50 off/on"), (">=", 3.0)) for a in (1, 32)],
    *[(f"#29 prefix cache, 32 clients over {a} adapter(s): tokens/s on / off", "prefix_cache",
       (f"adapters_{a}", "ratios", "tokens/s on/off"), (">=", 1.5)) for a in (1, 32)],
    # Issue #29 item 6: llama.cpp serving the same 32 adapters, each request naming its own (per-request `lora`).
    ("#29 32 clients over 32 adapters: tokens/s / llama.cpp with the same adapters exported (llamacpp-lora)",
     "serve_gen", ("clients_32", "ratios", "spread/llamacpp-lora"), (">=", 2.0)),
    ("MRPC epochs, batches padded to a multiple of 8: epoch time / to the longest (reported, no target)", "padding",
     ("multiple=8", "epoch time / multiple=1"), None),
    ("As above: resident memory after the last epoch / to the longest (reported, no target)", "padding",
     ("multiple=8", "last-epoch rss / multiple=1"), None),
    # Issue #28 item 3 (ERRATA #28): --packing, the same recipe and batch size (TRL's: sequences under packing).
    ("--packing on E2E rows (max length 128, batch 8): row tokens/s / unpacked", "packing",
     ("e2e", "ratios", "packed/unpacked tokens/s"), (">=", 1.0)),
    ("--packing on rows of varied lengths (E2E + long rows, max length 384, batch 4): row tokens/s / unpacked "
     "(reported, no target)", "packing", ("mixed", "ratios", "packed/unpacked tokens/s"), None),
    ("As above, E2E rows: packed / unpacked with as many rows per step (reported, no target)", "packing",
     ("e2e", "ratios", "packed/unpacked_matched tokens/s"), None),
    ("As above, varied lengths: packed / unpacked with as many rows per step (reported, no target)", "packing",
     ("mixed", "ratios", "packed/unpacked_matched tokens/s"), None),
    # Issue #26: QLoRA (bitsandbytes nf4 base, random weights, one step, each memory case in its own process).
    ("QLoRA Llama-2-7B shape: peak RSS of a training step, GB", "qlora",
     ("memory", "llama2-7b", "lorakit", "peak_rss_gb"), ("<=", 8.0)),
    ("QLoRA SmolLM2-1.7B shape: peak RSS nf4 / fp32 base", "qlora",
     ("memory", "smollm2-1.7b", "ratios", "lorakit/fp32 peak"), ("<=", 0.30)),
    ("QLoRA SmolLM2-1.7B shape: peak RSS lorakit / PEFT + bitsandbytes", "qlora",
     ("memory", "smollm2-1.7b", "ratios", "lorakit/peft peak"), ("<=", 1.0)),
    ("QLoRA SmolLM2-1.7B shape: peak RSS lorakit / PEFT, both with the capped allocator (reported, no target)",
     "qlora", ("memory", "smollm2-1.7b", "ratios", "lorakit/peft peak, both capped"), None),
    ("QLoRA SmolLM2-1.7B shape: step with the capped allocator / glibc default, lorakit (reported, no target)",
     "qlora", ("memory", "smollm2-1.7b", "ratios", "lorakit step, capped/default"), None),
    ("QLoRA SmolLM2-1.7B shape: step lorakit / PEFT + bitsandbytes (nf4, fp32 compute)", "qlora",
     ("speed", "smollm2-1.7b", "ratios", "lorakit/peft"), ("<=", 0.80)),
    ("QLoRA SmolLM2-135M: step lorakit / PEFT + bitsandbytes (nf4, fp32 compute, batch 8 x 128)", "qlora",
     ("speed", "smollm2", "ratios", "lorakit/peft"), ("<=", 0.80)),
    ("QLoRA SmolLM2-1.7B shape: step nf4 / fp32 base, lorakit (reported, no target)", "qlora",
     ("speed", "smollm2-1.7b", "ratios", "lorakit/fp32"), None),
    ("QLoRA SmolLM2-135M: step nf4 / fp32 base, lorakit (reported, no target)", "qlora",
     ("speed", "smollm2", "ratios", "lorakit/fp32"), None),
    # Issue #28: FSDP2 for causal LMs, built on the meta device (bench/fsdp_memory.py).
    ("FSDP / DDP peak RSS per process, 2 processes, SmolLM2-1.7B shape, r=8 q,v, gradient checkpointing",
     "fsdp_memory", ("ratios", "fsdp/ddp peak rss"), ("<=", 0.60)),
    ("FSDP / DDP step time, as above (gloo, CPU; reported, no target)", "fsdp_memory", ("ratios", "fsdp/ddp step"), None),
    # Issue #26: DoRA's step against lorakit's own LoRA step (PEFT's DoRA: about 2x its LoRA, peft #1474).
    ("DoRA step / LoRA step, lorakit, q/v (SmolLM2 shape)", "dora", ("q_proj,v_proj", "ratios",
                                                                      "lorakit_dora/lorakit_lora"), ("<=", 1.3)),
    ("DoRA step / LoRA step, lorakit, all-linear (SmolLM2 shape)", "dora", ("all-linear", "ratios",
                                                                             "lorakit_dora/lorakit_lora"), ("<=", 1.3)),
    ("DoRA step / LoRA step, PEFT, all-linear (reported, no target)", "dora", ("all-linear", "ratios",
                                                                                "peft_dora/peft_lora"), None),
    ("DoRA step lorakit / PEFT, all-linear (reported, no target)", "dora", ("all-linear", "ratios",
                                                                            "lorakit_dora/peft_dora"), None),
    # Issue #27: per-token time within 1.5x of the weight-bandwidth floor of the chosen format.
    ("Single stream q4_1 weights: ms/token / weight-bandwidth floor", "decode_step",
     ("formats", "q4_1", "over_floor"), ("<=", 1.5)),
    # Issue #27 item 4: quantized decoding against fp32, per E2E adapter (bench/quant_quality.py; ERRATA #27).
    *[(f"{fmt} decoding, {adapter} adapter: teacher-forced top-1 agreement with fp32 (100 E2E MRs)", "quant_quality",
       ("adapters", adapter, "agreement", fmt, "top1"), (">=", 0.95))
      for adapter in ("e2e-1500", "e2e-demo") for fmt in ("int8", "int4")],
    *[(f"{fmt} decoding, {adapter} adapter: E2E BLEU (beam 10, 100 MRs) - fp32's, absolute, points", "quant_quality",
       ("adapters", adapter, "bleu_abs_diff_points", fmt), ("<=", 0.5))
      for adapter in ("e2e-1500", "e2e-demo") for fmt in ("int8", "int4")],
    # Issue #29 item 5: llama-server --lora with the exported adapter, same greedy text on >= 18 of 20 E2E MRs.
    *[(f"llama.cpp on the {base} base + exported {adapter} adapter: E2E MRs of 20 with lorakit's greedy text",
       "gguf_export", (adapter, base, "adapter", "same_text"), (">=", 18))
      for adapter in ("e2e-1500", "e2e-demo") for base in ("q4_1", "f32")],
]


def targets(results: Path) -> list[str]:
    rows = ["| measure | target | measured | met |", "|---|---|---|---|"]
    for label, name, keys, target in TARGETS:
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        value = json.loads(path.read_text())["results"]
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            continue
        if target is None:
            rows.append(f"| {label} | — | {value:.3f} | — |")
            continue
        op, bound = target
        met = value <= bound if op == "<=" else value >= bound
        rows.append(f"| {label} | {op} {bound:.2f} | {value:.3f} | {'yes' if met else '**no**'} |")
    return rows


def build(results: Path) -> str:
    out = ["# Benchmarks", "", "Generated by `python bench/report.py` from `bench/results/*.json` "
           "(written by `make bench`; `make bench-quick` writes `*_quick.json`). Ratios are medians over "
           "interleaved rounds measured in one process.", "",
           "## Targets (full records only)", "", *targets(results), ""]
    for name, title, render in SECTIONS:
        for suffix in ("", "_quick"):
            path = results / f"{name}{suffix}.json"
            if not path.is_file():
                continue
            r = json.loads(path.read_text())
            env = r["environment"]
            cpu = env["cpu"] + (", bf16 native" if env.get("cpu_bf16") else "")
            command = COMMANDS.get(name, f"{name}.py")
            out += [f"## {title}{' (quick)' if suffix else ''}", "",
                    f"`python bench/{command}{' --quick' if suffix else ''}` — {r['time']}, git {str(env['git_sha'])[:10]}, "
                    f"{cpu}, {env['threads']} threads, torch {env['versions']['torch']}, peft {env['versions']['peft']}",
                    "", *render(r), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--out", default="docs/BENCH.md")
    args = parser.parse_args(argv)
    Path(args.out).write_text(build(Path(args.results)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
