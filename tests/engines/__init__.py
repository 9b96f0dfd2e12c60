"""Engines: embedded, vLLM (step loop and in-engine aggregation), upstream HTTP."""
