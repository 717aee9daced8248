"""Benchmark data generators (shapes, objects, Fashion-MNIST) and the shapes report."""
