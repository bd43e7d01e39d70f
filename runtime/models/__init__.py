"""Model implementations: plain torch modules that call kvpilot.kernels for attention."""
