"""stsr.pp."""
