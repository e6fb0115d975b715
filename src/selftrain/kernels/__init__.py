"""Fast paths under the transformers engine, each tested against the plain path it replaces."""
