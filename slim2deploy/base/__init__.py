"""Layer 0: what every stage needs: the project error, atomic file output, number formatting."""
