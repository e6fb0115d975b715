"""Configuration: the schema (every key and default) and the checks that run before a model loads."""
