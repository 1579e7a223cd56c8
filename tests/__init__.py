"""The test suite, and the fixtures the benchmarks and the fuzzer share with it (``tests.craft``, ``tests.minilm``, ``tests.runtime_fixtures``)."""
