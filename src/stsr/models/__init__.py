"""stsr.models."""
