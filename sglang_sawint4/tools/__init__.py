"""Tools: the offline SGLang bundle for air-gapped hosts, random-weight model generator."""
