"""stsr.tl."""
