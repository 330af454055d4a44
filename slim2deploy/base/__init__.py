"""Layer 0: what every stage needs: the project error, file checks and atomic output, number formatting and the
one JSON reader, the stage cache, the environment probe, SIGTERM handled as Ctrl-C."""
