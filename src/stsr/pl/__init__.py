"""stsr.pl."""
