"""Writing GGUF files: conversion plans (the plugin contract), the streaming writer, tokenizer keys."""

from __future__ import annotations

from porter.convert.plan import ConversionPlan, TensorPlan
from porter.convert.tokenizer import tokenizer_kv
from porter.convert.writer import OUTTYPES, TypeChange, WriteReport, write_gguf

__all__ = ["OUTTYPES", "ConversionPlan", "TensorPlan", "TypeChange", "WriteReport", "tokenizer_kv", "write_gguf"]
