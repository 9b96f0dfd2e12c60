"""dpicl eval and dpicl audit."""
