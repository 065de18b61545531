"""Benchmarks and the real-model cache they share with the tests."""
