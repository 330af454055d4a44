"""A fake of cuda-python for the tests: see tests/fakes/README.md (a regular package, so it shadows the real one)."""
