"""The private generation core: slots, the step loop, mechanisms, engines."""
