"""Sampling engines: the Sampler protocol and its transformers, OpenAI-server and vLLM implementations."""
