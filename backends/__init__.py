"""Adapters that apply rdalloc plans to real KV tensors: ``rdalloc.backends.torch``, ``rdalloc.backends.jax``.

Installed as ``rdalloc.backends`` (the repository keeps them in ``backends/``); importing this package imports no
framework, so the core stays usable without torch or JAX.
"""
