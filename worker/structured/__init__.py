"""Structured output: request specs turned into llguidance grammars, and per-request matchers
that restrict the engine's sampler to tokens the grammar allows.

`spec` and `tool_calls` need no tokenizer and no torch, so the model-agnostic gateway validates
and parses with them; `matcher` runs next to the engine.
"""
