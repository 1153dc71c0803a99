"""Serve-time receipts (issue 34): each adapter's receipt probes run through the server's own engine.

``lorakit serve --verify-adapters strict|warn|off`` (default ``strict``). At start-up, and on every load
(``POST /v1/adapters``, ``/v1/load_lora_adapter``), an adapter whose folder holds a receipt
(:mod:`lorakit.receipt`) is checked before any request can name it:

- its probes are prefilled as ordinary rows of the generation scheduler
  (:class:`lorakit.serving.generation.Probes`; the classification engine: its per-row forward), batched with
  the other requests' prompts within the same per-step prefill budget, through the per-row adapter path and
  ``--quantize``'s int8 / int4 layers: what requests get. Running streams keep advancing meanwhile;
- their log-probabilities are compared with the receipt's (top-1 agreement, max |Δ log-prob|, KL bound) at the
  tolerance of the precision and quantization in use (:data:`lorakit.receipt.TOLERANCES`, overridden by
  ``--verify-tolerance``), the served layers' base weights with the receipt's fingerprints, and the adapter
  file with the receipt's checksum.

``strict`` refuses an adapter that fails (its load answers 400 with the figures; at start-up the server does
not start), ``warn`` serves it with a warning, ``off`` reads no receipt. An adapter without a receipt is
served as ``unverified`` in every mode. ``/v1/models`` and ``/v1/adapters`` show each adapter's result.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..io import read_weights
from ..receipt import Receipt, checksum, compare, override, read_receipt, tolerance_key, tolerances_for
from .config import ClientError

__all__ = ["first_positions", "receipt_of", "check", "failed", "settle", "summary", "describe"]

def first_positions(reference: Receipt, length: int) -> Receipt:
    """``reference`` cut to its probes' first ``length`` positions (a server whose sequences are shorter than the
    probes: the outputs at a position depend on the tokens up to it only)."""
    ids = reference.tensors["probe.ids"]
    rows, full = ids.shape
    if length >= full:
        return reference
    per_position = {k: v.reshape(rows, full, *v.shape[1:])[:, :length].reshape(rows * length, *v.shape[1:])
                    for k, v in reference.tensors.items() if k.startswith("probe.") and k != "probe.ids"}
    tensors = {**reference.tensors, **per_position, "probe.ids": ids[:, :length].contiguous()}
    probes = reference.metadata["probes"]
    probes = {**probes, "shape": [rows, length]} if isinstance(probes, dict) else probes
    return Receipt(tensors, {**reference.metadata, "probes": probes})


def receipt_of(folder: str | Path, mode: str) -> Receipt | dict[str, Any] | None:
    """The receipt in ``folder`` to check (None: none, or ``mode`` off), or the failed report of an unreadable one."""
    try:
        return read_receipt(folder) if mode != "off" else None
    except ValueError as e:
        return failed(str(e))


def check(reference: Receipt, model: nn.Module, adapter: str, folder: str | Path, log_probs: Tensor | None,
          tolerance: str | None = None) -> dict[str, Any]:
    """``reference`` compared with ``adapter`` as served by ``model`` (``log_probs``: its probes' log-probabilities
    from the serving engine), and the checksum of the adapter file in ``folder``; ``verified`` says whether all agree."""
    tolerances = override(tolerance, tolerance_key(reference, model), tolerances_for(reference))
    report = compare(reference, model, adapter, tolerances, log_probs=log_probs)
    report["checksum"] = "equal" if checksum(read_weights(folder)) == reference.metadata["adapter_sha256"] else "different"
    report["verified"] = report["passed"] and report["checksum"] == "equal"
    return report


def failed(reason: str) -> dict[str, Any]:
    """The report of a check that could not run (an unreadable receipt, a probe row that failed)."""
    return {"verified": False, "reason": reason}


def settle(name: str, report: dict[str, Any] | None, mode: str, detach: Callable[[], None]) -> dict[str, Any]:
    """The result of adapter ``name``'s check (``report``; None: no receipt) under ``mode``, for ``/v1/models``.
    One that failed: under ``strict``, ``detach()`` it and raise a 400 that says why; under ``warn``, a warning."""
    if report is not None and not report["verified"]:
        message = describe(name, report)
        if mode == "strict":
            detach()
            raise ClientError(400, f"{message} (--verify-adapters strict refuses it; warn would serve it)")
        print(f"lorakit serve: warning: {message}", file=sys.stderr, flush=True)
    return summary(report, mode)


def summary(report: dict[str, Any] | None, mode: str) -> dict[str, Any]:
    """An adapter's result as ``/v1/models`` shows it."""
    if mode == "off":
        return {"status": "not checked"}
    if report is None:
        return {"status": "unverified", "reason": "no receipt"}
    out: dict[str, Any] = {"status": "verified" if report["verified"] else "failed"}
    if "reason" in report:
        return {**out, "reason": report["reason"]}
    out.update(base=report["fingerprint"]["status"], checksum=report["checksum"], tolerance=report["tolerance"]["key"])
    for key in ("top1_agreement", "max_abs_logprob", "kl_bound"):
        if key in report:
            out[key] = float(f"{report[key]:.4g}")
    return out


def describe(name: str, report: dict[str, Any]) -> str:
    """One line on why adapter ``name`` does not reproduce its receipt here."""
    if "reason" in report:
        return f"adapter {name!r} could not be checked against its receipt: {report['reason']}"
    tol, fp = report["tolerance"], report["fingerprint"]
    problems = []
    if fp["status"] == "different":
        problems.append(f"this server's base differs from the one it was trained on in {len(fp['differ'])} layer(s) "
                        f"({', '.join(fp['differ'][:3])}{' ...' if len(fp['differ']) > 3 else ''})")
    if report["checksum"] != "equal":
        problems.append("its file differs from the receipt's checksum (changed after it was saved)")
    if "top1_agreement" in report:
        limit = "" if tol["max_abs"] is None else f", max |Δ log-prob| {report['max_abs_logprob']:.3g} (<= {tol['max_abs']:g})"
        problems.append(f"outputs on the probes: top-1 agreement {100 * report['top1_agreement']:.2f}% "
                        f"(>= {100 * tol['top1']:g}%), KL bound {report['kl_bound']:.3g} (<= {tol['kl']:g}){limit}, "
                        f"tolerance {tol['key']}")
    return f"adapter {name!r} does not reproduce its receipt on this server: " + "; ".join(problems)
