"""Benchmarks of image_gen_async against baselines measured in the same run: ``python -m benchmarks``."""
