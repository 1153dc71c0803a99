"""Precision: bf16 only where the hardware has it natively."""

import pytest
import torch

from lorakit import precision, train


@pytest.mark.parametrize("flags, native", [({"avx2", "avx512_bf16"}, True), ({"avx2", "amx_bf16"}, True),
                                           ({"avx2", "fma"}, False), (set(), False)])
def test_auto_picks_bf16_only_where_native(monkeypatch, flags, native):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.native_bf16() is native
    assert precision.resolve_precision("auto") == ("bf16" if native else "fp32")
    assert precision.resolve_precision("fp32") == "fp32"
    # block-quantized weights (--quantize): the kernels compute in fp32, bf16 activations only add casts
    assert precision.resolve_precision("auto", quantized=True) == "fp32"
    assert precision.resolve_precision("bf16", quantized=True) == "bf16"  # asked for: kept


def test_forced_bf16_without_hardware_support_warns(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(UserWarning, match="bf16 on a cpu without native bf16 is emulated and much slower"):
        assert precision.resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'auto'\), got 'fp16'"):
        precision.resolve_precision("fp16")


def test_the_default_is_auto_and_bf16_autocasts():
    assert train.TrainConfig().precision == "auto"
    with precision.precision_context("fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with precision.precision_context("bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_run_records_name_the_cpu_model_and_its_speed_flags(monkeypatch):
    from lorakit import runfiles

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512_bf16", "sse4_2"}))
    assert precision.cpu_features() == ["avx2", "fma", "avx512_bf16"]  # only the flags that pick kernels
    record = runfiles.versions()
    assert record["cpu"] == precision.cpu_model() and record["cpu"] not in ("", "x86_64")
    assert record["cpu_flags"] == "avx2 fma avx512_bf16"
