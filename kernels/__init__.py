"""Tensor hot paths: tree attention masks for draft verification (torch reference + Triton)."""
