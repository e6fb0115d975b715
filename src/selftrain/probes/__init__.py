"""The monitor's probes: suites of held-out items, and the instruments that score them."""
