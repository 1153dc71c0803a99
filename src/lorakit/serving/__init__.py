"""Serving: the engines behind ``lorakit serve`` (moving here from the flat package, #33)."""

from .model_decoder import ModelDecoder

__all__ = ["ModelDecoder"]
