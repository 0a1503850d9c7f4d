"""Prompt sources: JSONL files and built-in tasks."""
from tao_fast.data.arithmetic import arithmetic_prompts, arithmetic_split
from tao_fast.data.prompts import PromptFileError, PromptRecord, read_jsonl

__all__ = ["PromptRecord", "PromptFileError", "read_jsonl", "arithmetic_prompts",
           "arithmetic_split"]
