"""Long fuzzing runs: ``python -m fuzz.fuzz_reader`` from the repository root."""
