"""The private generation core: slots, rows, plan and its spec, mechanisms, the gate, noise, prompts, generation end to end, the CLI."""
