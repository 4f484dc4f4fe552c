"""stsr.datasets."""
