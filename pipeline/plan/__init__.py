"""Planning: inputs -> datasets (organism, gene mapping, metadata) -> work units with global part ids."""
